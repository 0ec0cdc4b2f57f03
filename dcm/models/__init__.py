"""Model definitions and presets.

* :func:`build_sam_med3d` / :class:`SamMed3D`: the global-RoI expert's backbone (SAM-Med3D).
* :func:`load_model_config`: read a YAML preset from ``configs/models/`` (by name or path); it is
  :func:`dcm.config.load_model_config`, the one config reader, re-exported here.
* ``manifests.json``: state-dict layouts of the known checkpoints (used by :mod:`dcm.checkpoints`).
"""

from __future__ import annotations

from dcm.config import MODEL_CONFIG_DIR, list_model_configs, load_model_config
from dcm.models.sam_med3d import SamMed3D, build_sam_med3d

__all__ = ["build_sam_med3d", "SamMed3D", "load_model_config", "list_model_configs", "MODEL_CONFIG_DIR"]
