#!/bin/sh
# DCM inference as the challenge runs it: `sh predict.sh` turns every inputs/*.npz into outputs/<name>.npz.
# Folders: /workspace/inputs and /workspace/outputs when they exist, else ./inputs and ./outputs; or set
# DCM_INPUT_DIR / DCM_OUTPUT_DIR. Model: DCM_CONFIG (default configs/dcm.yaml), DCM_WEIGHTS (combined
# checkpoint), DCM_DEVICE (auto). Extra arguments are passed on (flags of inference/predict.py, key=value).
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python}" "$HERE/inference/predict.py" "$@"
