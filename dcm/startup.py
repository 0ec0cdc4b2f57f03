"""Start-up time of the processes that only run the networks (``predict.sh``).

The challenge starts ``predict.sh`` afresh at each of the 6 steps of every case and counts its start-up.
``import monai`` imports every MONAI submodule, and through MONAI's optional imports matplotlib, SciPy's
``stats`` / ``signal``, PIL, pandas, nibabel ...: about 4.5 s of a ~6 s MONAI import on a 2-core CPU, none
of it needed to run VISTA3D. :func:`import_monai_networks` imports MONAI while those optional packages
look absent, so MONAI records them as unavailable (its own lazy placeholders) and goes on; they stay
importable for everything else afterwards.

The price: in that process, the MONAI functions that need one of those packages raise MONAI's
``OptionalImportError`` (its transforms, metrics, visualisation ...). So only entry points that use MONAI
for its networks alone call it (``inference/predict.py``); ``DCM_LEAN_IMPORTS=0`` turns it off.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
from typing import Iterable, Optional, Sequence

__all__ = ["SKIPPED_OPTIONAL_PACKAGES", "import_monai_networks", "lean_imports_enabled"]

#: Packages (and subpackages) MONAI imports optionally that its networks (VISTA3D, SegResNetDS2) never use.
SKIPPED_OPTIONAL_PACKAGES: Sequence[str] = (
    "matplotlib", "scipy", "PIL", "pandas", "skimage", "sklearn", "nibabel", "SimpleITK", "itk",
    "tensorboard", "tensorboardX", "mlflow", "clearml", "IPython", "cucim", "cupy", "openslide", "tifffile",
    "pydicom", "lmdb", "psutil", "onnx", "onnxruntime", "transformers", "h5py", "zarr", "requests", "urllib3",
    "numpy.f2py",
)


class _Absent(importlib.abc.MetaPathFinder):
    """A finder that makes the named modules and packages (and their submodules) fail to import."""

    def __init__(self, packages: Iterable[str]):
        self.packages = tuple(packages)

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None, target: object = None):
        if any(fullname == p or fullname.startswith(p + ".") for p in self.packages):
            raise ModuleNotFoundError(f"{fullname} is skipped while MONAI is imported", name=fullname)
        return None


def lean_imports_enabled() -> bool:
    """False when the environment sets ``DCM_LEAN_IMPORTS=0``."""
    return os.environ.get("DCM_LEAN_IMPORTS", "1").strip() not in ("0", "false", "no", "off")


def import_monai_networks(lean: Optional[bool] = None) -> None:
    """Import MONAI's VISTA3D module; with ``lean`` (default :func:`lean_imports_enabled`) without the
    optional packages of :data:`SKIPPED_OPTIONAL_PACKAGES`.

    Does nothing special when MONAI is already imported. If the lean import fails for any reason, MONAI is
    imported again the normal way.
    """
    if lean is None:
        lean = lean_imports_enabled()
    if not lean or "monai" in sys.modules:
        importlib.import_module("monai.networks.nets.vista3d")
        return
    finder = _Absent(SKIPPED_OPTIONAL_PACKAGES)
    sys.meta_path.insert(0, finder)
    try:
        importlib.import_module("monai.networks.nets.vista3d")
        return
    except Exception:  # a MONAI version that needs one of them: fall back to the full import
        for name in [m for m in sys.modules if m == "monai" or m.startswith("monai.")]:
            del sys.modules[name]
    finally:
        sys.meta_path.remove(finder)
    importlib.import_module("monai.networks.nets.vista3d")
