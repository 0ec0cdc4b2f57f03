#!/bin/sh
# DCM inference as the challenge runs it: `sh predict.sh` turns every inputs/*.npz into outputs/<name>.npz.
# Folders: /workspace/inputs and /workspace/outputs when they exist, else ./inputs and ./outputs; or set
# DCM_INPUT_DIR / DCM_OUTPUT_DIR. Model: DCM_CONFIG (a path or preset name; default configs/dcm.yaml when
# weights are given), DCM_WEIGHTS (combined checkpoint), DCM_DEVICE (auto). With neither a config nor weights:
# the small CPU preset configs/dcm_small.yaml with the bundled weights/dcm_small.pt (one line says so).
# Extra arguments are passed on (flags of inference/predict.py, key=value).
HERE=$(cd "$(dirname "$0")" && pwd)
# glibc: keep freed memory in the process instead of returning large blocks to the kernel, so that each
# object's RoI-sized arrays reuse pages instead of faulting fresh ones in (0.3-0.8 s less per call on a
# 512x512x300 CT with 10 large objects). The process exits after one call; peak RSS measured about the same.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"
exec "${PYTHON:-python}" "$HERE/inference/predict.py" "$@"
