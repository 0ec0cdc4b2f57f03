"""NIfTI in and out for the browser page (``/`` and ``/page/*`` in :mod:`dcm.serve.app`).

The page never parses NIfTI itself: it sends the file's bytes and gets the volume back, because the server has
nibabel (every NIfTI-1 / NIfTI-2 flavour, scaling, orientation) and must keep the input's header anyway to
write the label map back with the same geometry.

Axes. nibabel gives the file's array as ``(i, j, k)`` (NIfTI's x, y, z voxel axes) with any orientation. The
page and DCM get it reoriented to the closest RAS+ grid (``nibabel.as_closest_canonical``: only axis
permutations and flips, no resampling) and transposed to DCM's ``(z, y, x)``: index ``z`` grows toward
Superior, ``y`` toward Anterior, ``x`` toward the patient's Right. The label map comes back in that layout and
:func:`labels_to_nifti` undoes both steps, so it lies on the input's own voxel grid, with its affine and header.
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["PageImage", "NiftiError", "read_nifti_bytes", "labels_to_nifti"]

_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


class NiftiError(ValueError):
    """The upload is not a NIfTI image the page can show (one line, the server answers 400)."""


@dataclass
class PageImage:
    """An uploaded NIfTI: DCM's view of it and what writing labels back needs.

    Attributes:
        volume: float32 ``(z, y, x)`` = (S, A, R) index order, see the module docstring.
        spacing_zyx: voxel size in mm along (z, y, x).
        header: the input's header (a copy), affine: its affine, ornt: its axes relative to RAS+ (nibabel
            orientation array), file_shape: its 3D voxel grid, name: the uploaded file name.
    """

    volume: np.ndarray
    spacing_zyx: Tuple[float, float, float]
    header: object
    affine: np.ndarray
    ornt: np.ndarray
    file_shape: Tuple[int, int, int]
    name: str
    warnings: List[str]

    def meta(self) -> Dict[str, object]:
        """What the page needs besides the voxels (JSON)."""
        import nibabel as nib

        finite = self.volume[np.isfinite(self.volume)]
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)  # the brightest tissue is not clipped to white
        return {"name": self.name, "shape": list(self.volume.shape), "spacing": list(self.spacing_zyx),
                "dtype": "float32", "axes": "(z, y, x) = (S, A, R): index grows toward Superior, Anterior, "
                "patient's Right", "file_axcodes": "".join(nib.aff2axcodes(self.affine)),
                "file_shape": list(self.file_shape), "range": [float(lo), float(hi)], "warnings": self.warnings}


def _gunzip(raw: bytes, name: str, max_bytes: int) -> bytes:
    """Decompress a gzip body, refusing more than ``max_bytes`` of output (a gzip bomb stays a 400)."""
    out = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = out.decompress(raw, max_bytes + 1)
    except zlib.error as e:
        raise NiftiError(f"{name}: not a readable gzip file ({e})") from None
    if len(data) > max_bytes:
        raise NiftiError(f"{name}: decompressed it is over the limit of {max_bytes} bytes")
    if not out.eof:
        raise NiftiError(f"{name}: the gzip stream is truncated")
    return data


def read_nifti_bytes(raw: bytes, name: str = "upload", max_bytes: int = 2 << 30) -> PageImage:
    """Parse an uploaded ``.nii`` / ``.nii.gz`` (detected by content, not by name) for the page.

    Raises:
        NiftiError: not a NIfTI-1 / NIfTI-2 single-file image, truncated, or not 3D (a 4D image keeps its first
        volume, with a warning).
    """
    import nibabel as nib

    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw, name, max_bytes)
    if len(raw) < 348:
        raise NiftiError(f"{name}: {len(raw)} bytes is too short for a NIfTI file")
    sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    if 348 in sizeof_hdr:
        klass = nib.Nifti1Image
    elif 540 in sizeof_hdr:
        klass = nib.Nifti2Image
    else:
        raise NiftiError(f"{name}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    try:
        img = klass.from_bytes(raw)
        shape = img.shape
        if len(shape) < 3 or any(int(d) < 1 for d in shape[:3]):
            raise NiftiError(f"{name}: a {len(shape)}D image of shape {list(shape)}; expected a 3D image")
        warnings: List[str] = []
        if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
            warnings.append(f"{name} is {len(shape)}D {list(shape)}: showing its first volume")
        index = (slice(None),) * 3 + (0,) * (len(shape) - 3)
        data = np.asarray(img.dataobj[index], dtype=np.float32)
    except NiftiError:
        raise
    except Exception as e:  # nibabel's own errors: truncated data, bad header fields...
        raise NiftiError(f"{name}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    if np.iscomplexobj(data) or data.ndim != 3:
        raise NiftiError(f"{name}: voxels are not scalar")
    ornt = nib.io_orientation(img.affine)
    ras = nib.apply_orientation(data, ornt)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    zooms_ras = np.empty(3)
    zooms_ras[ornt[:, 0].astype(int)] = zooms
    if not np.all(np.isfinite(zooms_ras)) or np.any(zooms_ras <= 0):
        warnings.append(f"{name}: voxel sizes {zooms.tolist()} are not positive: 1 mm assumed")
        zooms_ras = np.ones(3)
    volume = np.ascontiguousarray(ras.transpose(2, 1, 0))
    spacing = tuple(float(v) for v in zooms_ras[::-1])
    file_shape = tuple(int(d) for d in shape[:3])
    return PageImage(volume=volume, spacing_zyx=spacing, header=img.header.copy(),  # type: ignore[arg-type]
                     affine=np.array(img.affine), ornt=ornt, file_shape=file_shape,  # type: ignore[arg-type]
                     name=name, warnings=warnings)


def labels_to_nifti(labels_zyx: np.ndarray, image: PageImage) -> bytes:
    """The ``.nii.gz`` bytes of a ``(z, y, x)`` label map on ``image``'s grid, in the input's voxel order with its
    affine and header (data type uint8 or uint16, no scaling); written in memory, nothing on disk."""
    import nibabel as nib

    if labels_zyx.shape != image.volume.shape:
        raise NiftiError(f"label map shape {list(labels_zyx.shape)} is not the image's {list(image.volume.shape)}")
    back = nib.orientations.ornt_transform(_RAS, image.ornt)
    data = np.ascontiguousarray(nib.apply_orientation(labels_zyx.transpose(2, 1, 0), back))
    header = image.header.copy()
    img = _image_class(header)(data, image.affine, header)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(data.max()) if data.size else 0
    img.header.set_intent("label")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def _image_class(header: object) -> type:
    """Nifti2Image for a NIfTI-2 header, else Nifti1Image."""
    import nibabel as nib

    return nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
