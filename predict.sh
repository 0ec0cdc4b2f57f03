#!/bin/sh
# DCM inference as the challenge runs it: `sh predict.sh` turns every inputs/*.npz into outputs/<name>.npz.
# Folders: /workspace/inputs and /workspace/outputs when they exist, else ./inputs and ./outputs; or set
# DCM_INPUT_DIR / DCM_OUTPUT_DIR. Model: DCM_CONFIG (default configs/dcm.yaml), DCM_WEIGHTS (combined
# checkpoint), DCM_DEVICE (auto). Extra arguments are passed on (flags of inference/predict.py, key=value).
HERE=$(cd "$(dirname "$0")" && pwd)
# glibc: keep freed memory in the process instead of returning large blocks to the kernel, so that each
# object's RoI-sized arrays reuse pages instead of faulting fresh ones in (0.3-0.8 s less per call on a
# 512x512x300 CT with 10 large objects). The process exits after one call; peak RSS measured about the same.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"
exec "${PYTHON:-python}" "$HERE/inference/predict.py" "$@"
