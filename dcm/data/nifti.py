"""NIfTI (and other SimpleITK formats) <-> ``(z, y, x)`` arrays plus the geometry to write them back.

``SimpleITK.GetArrayFromImage`` already gives ``(z, y, x)``; the geometry keeps what SimpleITK reports
(``spacing`` and ``origin`` in ``(x, y, z)`` order, ``direction`` as 9 row-major numbers) so that an image
read and written back has exactly the same geometry. NIfTI stores these as float32, so geometry that did not
come from a NIfTI file is rounded to float32 on the first write (and then stays put).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

from dcm.atomic import atomic_path
from dcm.errors import CaseError

__all__ = ["Geometry", "read_nifti", "write_nifti", "image_suffix", "NILEARN_REQUIREMENT", "find_mni_files"]

PathLike = Union[str, os.PathLike]

#: dtypes SimpleITK writes as they are; others are converted (bool -> uint8, float16 -> float32).
_WRITABLE = {np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                                   "float32", "float64")}


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a 3D image lie in physical space, as SimpleITK gives it.

    Attributes:
        spacing_xyz: voxel size along x, y, z (the challenge's ``spacing`` order).
        origin: physical position of voxel (0, 0, 0), (x, y, z).
        direction: 3 x 3 direction cosines, row-major, 9 numbers.
    """

    spacing_xyz: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_xyz", tuple(float(v) for v in self.spacing_xyz))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.spacing_xyz) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 spacings, 3 origin values and 9 direction values")

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        """Spacing in array-axis order (z, y, x)."""
        return self.spacing_xyz[::-1]  # type: ignore[return-value]

    def matches(self, other: "Geometry", rtol: float = 1e-5, atol: float = 1e-4) -> bool:
        """Same grid up to float32 storage noise (spacing, origin and direction all close)."""
        return all(
            np.allclose(a, b, rtol=rtol, atol=atol)
            for a, b in ((self.spacing_xyz, other.spacing_xyz), (self.origin, other.origin),
                         (self.direction, other.direction))
        )

    @classmethod
    def from_image(cls, image: "object") -> "Geometry":
        """The geometry of a 3D ``SimpleITK.Image``."""
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())  # type: ignore[attr-defined]


def image_suffix(path: PathLike) -> str:
    """``.nii.gz`` for ``a/b.nii.gz``, ``.mha`` for ``b.mha``: the extension SimpleITK picks the format by."""
    name = Path(path).name
    for double in (".nii.gz", ".nrrd.gz"):
        if name.lower().endswith(double):
            return name[-len(double):]
    return Path(name).suffix


def read_nifti(path: PathLike) -> Tuple[np.ndarray, Geometry]:
    """Read a 3D image.

    Args:
        path: a ``.nii.gz`` / ``.nii`` file (any format SimpleITK reads works).

    Returns:
        ``(array, geometry)``: the (z, y, x) array in the file's own dtype and its :class:`Geometry`.
        A 4D image with a single volume (a trailing dimension of size 1) is squeezed to 3D.

    Raises:
        CaseError: the file is missing or unreadable, has several components per voxel, or is not 3D.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise CaseError(path, None, "no such file")
    _check_nifti_complete(path)
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line warnings; errors still raise
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CaseError(path, None, f"not a readable image ({_itk_reason(e)})") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(path, None, f"{image.GetNumberOfComponentsPerPixel()} components per voxel; "
                        "expected a scalar 3D image")
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
    elif dim != 3:
        raise CaseError(path, None, f"{dim}D image of size {size} (x, y, z, ...); expected a 3D image")
    return sitk.GetArrayFromImage(image), Geometry.from_image(image)


def _itk_reason(e: BaseException) -> str:
    """ITK's own reason from a SimpleITK exception (its first line is only where it was thrown)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "ITK ERROR:" in ln:
            reason = ln.split("ITK ERROR:", 1)[1].strip()
            head, sep, tail = reason.partition("): ")  # "ImageFileReader(0x55...): the reason"
            return " ".join((tail if sep and "(0x" in head else reason).split())
    return lines[-1] if lines else type(e).__name__


def _nifti_data_end(header: bytes) -> Optional[int]:
    """Where the voxel data of a NIfTI-1 / NIfTI-2 file ends (vox_offset + voxels x bytes), or None when
    ``header`` is not a NIfTI header (SimpleITK then judges the file)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = max(int(struct.unpack(order + "f", header[108:112])[0]), 348)
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = max(struct.unpack(order + "q", header[168:176])[0], 540)
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or bitpix % 8 or any(d < 0 for d in dims[1:dims[0] + 1]):
        return None
    return offset + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=object)) * (bitpix // 8)


def _check_nifti_complete(path: Path) -> None:
    """Refuse a ``.nii`` / ``.nii.gz`` file that ends before its voxel data does (SimpleITK reads a
    truncated file without a word, leaving the missing voxels zero).

    Raises:
        CaseError: naming the file, the size expected and found.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    gz = name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            end = _nifti_data_end(f.read(540))
    except (EOFError, OSError, zlib.error):
        end = None
    if end is None:  # not a NIfTI header: SimpleITK says what the file is
        return
    if not gz:
        size = path.stat().st_size
    else:
        with open(path, "rb") as raw:  # the gzip trailer: uncompressed size mod 2**32 (no full read when it fits)
            raw.seek(-4, os.SEEK_END)
            if struct.unpack("<I", raw.read(4))[0] == end % (1 << 32):
                return
        size = 0
        try:
            with gzip.open(path, "rb") as f:
                while block := f.read(1 << 24):  # the exact count, and whether the stream ends properly
                    size += len(block)
        except (EOFError, OSError, zlib.error) as e:
            raise CaseError(path, None, f"truncated or corrupt file ({type(e).__name__}: {e})") from None
    if size < end:
        raise CaseError(path, None, f"truncated file: the header declares {end} bytes of data, the file holds "
                                    f"{size}{' once decompressed' if gz else ''}")


def write_nifti(path: PathLike, array: np.ndarray, geometry: Optional[Geometry] = None,
                compress: bool = True) -> Path:
    """Write a (z, y, x) array as a 3D image, atomically (``path`` is either absent or complete).

    Args:
        path: output file; its extension picks the format (``.nii.gz``, ``.nii``, ``.mha``, ...).
        array: (z, y, x); bool is written as uint8, float16 as float32.
        geometry: spacing / origin / direction; default: 1 mm isotropic at the origin, identity direction.
        compress: let SimpleITK compress (``.nii.gz`` is always gzipped).

    Raises:
        ValueError: the array is not 3D or has an unsupported dtype.
    """
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    if array.dtype not in _WRITABLE:
        raise ValueError(f"cannot write dtype {array.dtype}")
    geometry = geometry or Geometry()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing_xyz)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)

    path = Path(path)
    # The temporary name keeps the real extension: SimpleITK chooses the writer from it.
    with atomic_path(path, suffix=image_suffix(path) or ".nii.gz") as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


# ------------------------------------------------------------ the MNI152 template shipped with nilearn

#: the nilearn release whose bundled MNI152 files the demo and the real-MRI sets read.
NILEARN_REQUIREMENT = "nilearn==0.14.1"

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def find_mni_files() -> Optional[Dict[str, Path]]:
    """The MNI152 2009a T1 template and GM / WM maps shipped in the installed ``nilearn`` package, located
    without importing it (and so without its dependencies); None when nilearn is not installed."""
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        folder = Path(root) / "datasets" / "data"
        files = {k: folder / v for k, v in MNI_FILES.items()}
        if all(p.is_file() for p in files.values()):
            return files
    return None
