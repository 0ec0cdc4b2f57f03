"""Data I/O: challenge cases, NIfTI, nnU-Net datasets, the synthetic generator."""

from dcm.data.cases import (  # noqa: F401
    Box,
    Case,
    Click,
    ObjectPrompts,
    atomic_savez,
    case_from_arrays,
    case_to_arrays,
    load_case,
    save_segmentation,
)
