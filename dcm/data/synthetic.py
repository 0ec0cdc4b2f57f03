"""Deterministic synthetic cases in the challenge format, with five modality flavours.

Every case is a multi-object phantom: organ-like blobs (smooth ellipsoids with a randomly perturbed surface),
optionally one thin vessel-like tube, rendered with the noise and artefacts of its modality:

==============  ==================================================================================  =====
flavour         looks like                                                                          boxes
==============  ==================================================================================  =====
``CT``          3-7 touching organs of fairly uniform intensity in a body outline, Gaussian noise,  yes
                thick slices (spacing e.g. (0.8, 0.8, 5.0)); sometimes a vessel
``MR``          2-5 blobs of varied contrast in a head / body outline, smooth bias field, Rician    yes
                noise; often a thin bright vessel
``PET``         1-4 hot spots in a low-uptake body, blurred, low-count Poisson noise, 3-4 mm voxels  yes
``US``          1-2 objects (a dark cyst-like one, maybe a bright shadowing one), speckle,           yes
                attenuation with depth (probe at y = 0), acoustic shadow, bright interfaces
``Microscopy``  10-30 small nucleus-like instances, blur, shot noise, near-isotropic spacing        no
==============  ==================================================================================  =====

``variety="rich"`` (CLI ``--variety rich``; the default ``basic`` generates exactly what it always did) adds
the lesion- and CT-like variety the templates lack: one large organ around the others (up to about half the
volume), lobulated lesions (clusters of lobes), irregular lesions (rough, with spicules), tiny lesions (a
few to a few dozen voxels), thin ducts (1-2 voxels wide), a branching vessel tree instead of the tube (no
boxes), lesions inside organs, some objects with low contrast to their neighbourhood, unlabelled tissue of
the same intensity touching some objects, partial-volume (blurred) edges and a multiplicative bias field.

A case that holds a tube has no ``boxes`` key (as vessel cases in the challenge). Labels are sequential
``1..N`` (objects that vanished are dropped), every object is one 26-connected component of at least
:data:`MIN_OBJECT_VOXELS` voxels, and objects may touch but never overlap.

Shapes are built on each object's own bounding box, so a 300 x 512 x 512 case takes seconds. The same seed
gives byte-identical arrays (on the same platform).

Usage::

    python -m dcm.data.synthetic --out data/synthetic --cases 10 --seed 0 --shape 32 64 64
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from dcm.data.cases import MAX_OBJECTS, atomic_savez, case_to_arrays
from dcm.protocol import boxes_from_labels
from dcm.regions import mask_bbox

__all__ = [
    "FLAVOURS",
    "VARIETIES",
    "RICH_KINDS",
    "DEFAULT_SHAPE",
    "MIN_OBJECT_VOXELS",
    "FlavourSpec",
    "FLAVOUR_SPECS",
    "canonical_flavour",
    "generate_case",
    "generate_dataset",
    "case_seed",
    "main",
]

FLAVOURS: Tuple[str, ...] = ("CT", "MR", "PET", "US", "Microscopy")
#: (z, y, x); small enough for unit tests.
DEFAULT_SHAPE: Tuple[int, int, int] = (32, 64, 64)
#: objects with fewer voxels after overlap resolution are dropped.
MIN_OBJECT_VOXELS = 8

Shape = Tuple[int, int, int]


@dataclass(frozen=True)
class FlavourSpec:
    """How one flavour lays out its objects (rendering is flavour-specific code).

    Attributes:
        n_objects: inclusive range of the number of objects drawn per case (a tube counts as one).
        tube_probability: chance that one of the objects is a thin tube (the case then has no boxes).
        has_boxes: False for flavours whose cases never have boxes (microscopy instances).
        touch: blob radius as a fraction of the distance to the nearest other centre; about 0.5 and
            above makes neighbours touch.
        radius: clip range of the blob radius, as a fraction of the half-extent of the volume.
        roughness: relative amplitude of the random surface perturbation of the blobs.
        region: centres lie in ``|u_z| <= region[0]`` and ``u_y**2 + u_x**2 <= region[1]**2`` of the
            normalised coordinates ``u`` in [-1, 1]; ``region[1] = None`` means the square ``|u_y|, |u_x|
            <= region[0]``.
    """

    n_objects: Tuple[int, int]
    tube_probability: float
    has_boxes: bool
    touch: float
    radius: Tuple[float, float]
    roughness: float
    region: Tuple[float, Optional[float]]


FLAVOUR_SPECS: Dict[str, FlavourSpec] = {
    "CT": FlavourSpec((3, 7), 0.2, True, 0.7, (0.15, 0.45), 0.4, (0.7, 0.6)),
    "MR": FlavourSpec((2, 5), 0.5, True, 0.45, (0.12, 0.35), 0.35, (0.6, 0.55)),
    "PET": FlavourSpec((1, 4), 0.0, True, 0.35, (0.07, 0.2), 0.25, (0.7, 0.55)),
    "US": FlavourSpec((1, 2), 0.0, True, 0.45, (0.2, 0.4), 0.25, (0.55, 0.45)),
    "Microscopy": FlavourSpec((10, 30), 0.0, False, 0.55, (0.06, 0.2), 0.15, (0.85, None)),
}


def canonical_flavour(name: str) -> str:
    """``"ct"`` -> ``"CT"``, ``"microscopy"`` -> ``"Microscopy"``, ... (also accepts ``MRI``, ``Ultrasound``)."""
    key = name.strip().rstrip("_").lower()
    aliases = {"mri": "MR", "ultrasound": "US"}
    if key in aliases:
        return aliases[key]
    for f in FLAVOURS:
        if f.lower() == key:
            return f
    raise ValueError(f"unknown flavour {name!r}; choose from {', '.join(FLAVOURS)}")


# --------------------------------------------------------------------------------------- smooth fields


def _interp_weights(n: int, nodes: int) -> np.ndarray:
    """(n, nodes) row-normalised Gaussian weights that smoothly interpolate ``nodes`` values onto ``n`` samples."""
    if nodes <= 1:
        return np.ones((n, 1), dtype=np.float32)
    t = (np.arange(n) + 0.5) / n
    k = np.linspace(0.0, 1.0, nodes)
    w = np.exp(-0.5 * ((t[:, None] - k[None, :]) * (nodes - 1)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _expand(coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A smooth (z, y, x) float32 field of ``shape`` interpolated from a small coarse (cz, cy, cx) grid.

    A tensor product of 1D interpolants (three small matrix products), so it costs about ``cz`` operations
    per output voxel instead of a whole-volume filter.
    """
    cz, cy, cx = coarse.shape
    wz, wy, wx = (_interp_weights(int(n), c) for n, c in zip(shape, coarse.shape))
    f = coarse.astype(np.float32) @ wx.T  # (cz, cy, W)
    f = wy @ f  # (cz, H, W)
    return (wz @ f.reshape(cz, -1)).reshape(tuple(int(s) for s in shape))


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: Sequence[int]) -> np.ndarray:
    """A random smooth (z, y, x) float32 field scaled to [-1, 1]; ``cells`` coarse nodes per axis."""
    coarse = rng.standard_normal(tuple(max(1, int(c)) for c in cells))
    f = _expand(coarse, shape)
    peak = max(float(f.max()), -float(f.min()))
    if peak > 0:
        f *= np.float32(1.0 / peak)
    return f


def _cells(shape: Sequence[int], scale: int, cap: int) -> Tuple[int, int, int]:
    """Coarse grid size for a texture with features about ``scale`` voxels wide (at most ``cap`` nodes per axis)."""
    return tuple(int(min(cap, max(2, s // scale))) for s in shape)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- objects


#: nodes per axis of a blob's surface perturbation (more: bumpier surfaces).
_NODES = 5


@dataclass
class _Blob:
    """A perturbed ellipsoid, rotated in the (y, x) plane, evaluated on (part of) its own bounding box.

    A voxel is inside when ``rho < scale``: ``rho`` is the ellipsoidal distance from the centre (1 on the
    unperturbed surface) and ``scale = 1 + roughness * field`` the smooth random surface perturbation. The
    ratio ``rho / scale`` decides which of two overlapping blobs owns a voxel ("relatively closer wins").
    """

    center: np.ndarray  # (3,) voxel (z, y, x)
    radii: np.ndarray  # (3,) voxels: z, in-plane major, in-plane minor
    angle: float
    roughness: float
    coarse: np.ndarray  # (_NODES,) * 3 surface perturbation nodes
    lo: np.ndarray  # (3,) bounding box start, inclusive
    hi: np.ndarray  # (3,) bounding box end, exclusive

    @classmethod
    def make(cls, rng: np.random.Generator, center: np.ndarray, radii: np.ndarray, roughness: float,
             shape: Shape) -> "_Blob":
        angle = float(rng.uniform(0.0, math.pi))
        coarse = rng.standard_normal((_NODES,) * 3)
        reach = np.array([radii[0], radii[1:].max(), radii[1:].max()]) * (1.0 + roughness) + 1.0
        lo = np.clip(np.floor(center - reach), 0, None).astype(int)
        hi = np.minimum(np.ceil(center + reach).astype(int) + 1, np.array(shape))
        # Normalise the perturbation to about [-1, 1] once (on a subsampled grid: any fixed constant keeps
        # every later sub-box evaluation consistent).
        w = [_interp_weights(int(n), _NODES)[:: max(1, int(n) // 24)] for n in hi - lo]
        field = np.einsum("ijk,ai,bj,ck->abc", coarse, *w)
        coarse = coarse / max(float(field.max()), -float(field.min()), 1e-6)
        return cls(center, radii, angle, roughness, coarse, lo, hi)

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    def evaluate(self, lo: Optional[np.ndarray] = None, hi: Optional[np.ndarray] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """``(rho**2, scale**2)``, both (z, y, x) float32 on the sub-box ``[lo, hi)`` of the bounding box."""
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        dz, dy, dx = (np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, self.center))
        c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        q1 = (c * dy[:, None] + s * dx[None, :]) / np.float32(self.radii[1])
        q2 = (-s * dy[:, None] + c * dx[None, :]) / np.float32(self.radii[2])
        rho2 = ((dz / np.float32(self.radii[0])) ** 2)[:, None, None] + (q1 * q1 + q2 * q2)[None]
        # The interpolation weights sum to 1, so interpolating 1 + roughness * nodes gives the scale directly.
        nodes = (1.0 + self.roughness * self.coarse).astype(np.float32)
        wz, wy, wx = (_interp_weights(int(n), _NODES)[a - o:b - o]
                      for n, a, b, o in zip(self.hi - self.lo, lo, hi, self.lo))
        f = wy @ (nodes @ wx.T)
        scale2 = (wz @ f.reshape(_NODES, -1)).reshape(rho2.shape)
        return rho2, np.multiply(scale2, scale2, out=scale2)


def _sample_centres(rng: np.random.Generator, n: int, region: Tuple[float, Optional[float]]) -> np.ndarray:
    """``n`` well-spread centres in normalised (z, y, x) coordinates in [-1, 1] (best-candidate sampling)."""
    zb, rad = region
    centres: List[np.ndarray] = []
    for _ in range(n):
        cand = rng.uniform(-1.0, 1.0, size=(48, 3))
        cand[:, 0] *= zb
        if rad is None:
            cand[:, 1:] *= zb
        else:
            cand[:, 1:] *= rad
            cand = cand[(cand[:, 1:] ** 2).sum(axis=1) <= rad**2]
        if centres:
            d = np.linalg.norm(cand[:, None, :] - np.array(centres)[None], axis=2).min(axis=1)
            centres.append(cand[int(np.argmax(d))])
        else:
            centres.append(cand[0])
    return np.array(centres)


def _make_blobs(rng: np.random.Generator, n: int, spec: FlavourSpec, shape: Shape) -> List[_Blob]:
    if n == 0:
        return []
    u = _sample_centres(rng, n, spec.region)
    if n > 1:
        d = np.linalg.norm(u[:, None] - u[None], axis=2)
        np.fill_diagonal(d, np.inf)
        nearest = d.min(axis=1)
    else:
        nearest = np.full(1, 2.0)
    r = np.clip(spec.touch * nearest, *spec.radius)
    shape_arr = np.array(shape, dtype=np.float64)
    half = np.array([shape_arr[0], shape_arr[1:].min(), shape_arr[1:].min()]) / 2.0
    blobs = []
    for i in range(n):
        radii = np.maximum(r[i] * rng.uniform(0.75, 1.25, size=3) * half, 1.5)
        radii[1:] = np.sort(radii[1:])[::-1]
        center = (u[i] + 1.0) / 2.0 * shape_arr - 0.5
        blobs.append(_Blob.make(rng, center, radii, spec.roughness, shape))
    return blobs


def _paint_blobs(labels: np.ndarray, blobs: List[_Blob]) -> None:
    """Paint blob ``k`` as label ``k + 1``; a voxel inside several goes to the one with the lowest rho / scale."""
    for k, blob in enumerate(blobs, start=1):
        rho2, scale2 = blob.evaluate()
        mask = rho2 < scale2
        region = labels[blob.slices]
        for j in np.flatnonzero(np.bincount(region[mask], minlength=1)[1:]) + 1:
            other = blobs[int(j) - 1]
            lo, hi = np.maximum(blob.lo, other.lo), np.minimum(blob.hi, other.hi)
            sub = tuple(slice(int(a), int(b)) for a, b in zip(lo - blob.lo, hi - blob.lo))
            rho2_j, scale2_j = other.evaluate(lo, hi)
            # rho / scale >= rho_j / scale_j, squared and cross-multiplied (everything is positive).
            lose = mask[sub] & (region[sub] == j) & (rho2[sub] * scale2_j >= rho2_j * scale2[sub])
            mask[sub][lose] = False
        region[mask] = k


def _tube_points(rng: np.random.Generator, shape: Shape, axis: Optional[int]) -> np.ndarray:
    """Densely sampled (n, 3) voxel points of a random smooth curve (cubic Bezier) crossing the volume."""
    if axis is None:
        axis = int(rng.integers(0, 3))
    ctrl = rng.uniform(-0.6, 0.6, size=(4, 3))
    ctrl[0, axis], ctrl[3, axis] = -0.9, 0.9
    ctrl[1:3, axis] = np.sort(rng.uniform(-0.5, 0.5, size=2))
    shape_arr = np.array(shape, dtype=np.float64)
    ctrl = (ctrl + 1.0) / 2.0 * shape_arr - 0.5
    length = np.linalg.norm(np.diff(ctrl, axis=0), axis=1).sum()
    t = np.linspace(0.0, 1.0, max(16, int(4 * length)))[:, None]
    pts = ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t**2 * ctrl[2]
           + t**3 * ctrl[3])
    return np.clip(np.rint(pts), 0, shape_arr - 1).astype(np.int64)


def _ball_offsets(r: float, rz: float) -> np.ndarray:
    """(k, 3) integer (z, y, x) offsets inside the ellipsoid of semi-axes ``(rz, r, r)`` voxels."""
    ext = np.ceil([rz, r, r]).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-e, e + 1) for e in ext), indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[((grid / np.array([rz, r, r])) ** 2).sum(axis=1) <= 1.0]


def _stamp(labels: np.ndarray, points: np.ndarray, ball: np.ndarray, label: int) -> None:
    """Paint ``label`` over whatever is there at every (n, 3) voxel point dilated by the ``ball`` offsets."""
    pts = np.unique(points, axis=0)
    vox = (pts[:, None, :] + ball[None]).reshape(-1, 3)
    vox = vox[np.all((vox >= 0) & (vox < np.array(labels.shape)), axis=1)]
    labels[tuple(vox.T)] = label


def _paint_tube(rng: np.random.Generator, labels: np.ndarray, label: int, axis: Optional[int]) -> None:
    """Paint a thin tube (a smooth curve dilated by a small ellipsoid) over whatever is there."""
    shape = labels.shape
    plane = min(shape[1:])
    r = max(1.0, float(rng.uniform(0.012, 0.025)) * plane)
    rz = max(0.5, r * shape[0] / plane)
    ball = _ball_offsets(r, rz)
    _stamp(labels, _tube_points(rng, shape, axis), ball, label)


def _clean_labels(labels: np.ndarray) -> Tuple[np.ndarray, List[int]]:
    """Keep each label's largest 26-connected component, drop tiny objects, relabel ``1..N`` in order.

    Returns:
        The relabelled (z, y, x) map and, for each new label ``i + 1``, its old label.
    """
    import cc3d

    lut = np.zeros(int(labels.max()) + 1, dtype=labels.dtype)
    kept: List[int] = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl]
        comp, n_comp = cc3d.connected_components(crop == k, connectivity=26, return_N=True)
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        if n_comp > 1:
            crop[(comp != 0) & (comp != int(np.argmax(sizes)))] = 0
        if sizes.max() >= MIN_OBJECT_VOXELS:
            kept.append(k)
            lut[k] = len(kept)
        else:
            crop[comp != 0] = 0
    if kept == list(range(1, len(lut))):
        return labels, kept
    return lut[labels], kept


# ------------------------------------------------------------------------------------------- rendering


def _in_plane_ellipse(shape: Shape, ry: float, rx: float) -> np.ndarray:
    """(H, W) bool: an ellipse centred in the slice, semi-axes ``ry``, ``rx`` in normalised units."""
    _, H, W = shape
    uy = (np.arange(H) + 0.5) / H * 2 - 1
    ux = (np.arange(W) + 0.5) / W * 2 - 1
    return (uy[:, None] / ry) ** 2 + (ux[None, :] / rx) ** 2 <= 1.0


def _lut_image(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)[labels]


@dataclass
class _Look:
    """What the ``rich`` variety changes in a renderer's piecewise-constant intensity model.

    Attributes:
        close_to: render label -> the render label (0: background) whose mean it gets close to (low
            contrast to its neighbourhood: a lesion in its host organ, a faint object in tissue).
        imitates: render label of an unlabelled tissue patch -> the object it touches and imitates.
        edge_sigma: Gaussian blur (voxels) of the mean image: partial volume at every edge.
    """

    close_to: Dict[int, int]
    imitates: Dict[int, int]
    edge_sigma: float


def _look_image(rng: np.random.Generator, labels: np.ndarray, mean: np.ndarray,
                look: Optional[_Look]) -> np.ndarray:
    """The (z, y, x) float32 mean image of a renderer; with a ``look``, its low-contrast objects, imitating
    tissue and blurred edges first (``mean`` is changed in place, so later uses of it agree)."""
    if look is None:
        return _lut_image(labels, mean)
    for label, other in sorted(look.close_to.items()):
        mean[label] = mean[other] + float(rng.uniform(5.0, 14.0)) * float(rng.choice([-1.0, 1.0]))
    for label, other in sorted(look.imitates.items()):
        mean[label] = mean[other] + float(rng.uniform(-4.0, 4.0))
    np.clip(mean, 1.0, 250.0, out=mean)
    return ndimage.gaussian_filter(_lut_image(labels, mean), sigma=look.edge_sigma, truncate=2.5)


def _bg_fg(labels: np.ndarray, background: float, objects: float) -> np.ndarray:
    """(z, y, x) float32: ``background`` where the label is 0, ``objects`` elsewhere."""
    return np.where(labels == 0, np.float32(background), np.float32(objects))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    np.clip(img, 0, 255, out=img)
    np.rint(img, out=img)
    return img.astype(np.uint8)


def _render_ct(rng: np.random.Generator, labels: np.ndarray, kinds: List[str],
               look: Optional["_Look"] = None) -> np.ndarray:
    shape = labels.shape
    n = len(kinds)
    mean = np.empty(n + 1)
    mean[0] = rng.uniform(90, 110)  # fat / muscle
    mean[1:] = rng.uniform(125, 215, size=n)  # contrast-enhanced organs
    mean[1:][np.array(kinds) == "tube"] = rng.uniform(225, 245)
    img = _look_image(rng, labels, mean, look)
    img += np.float32(rng.uniform(4, 8)) * _smooth_field(rng, shape, _cells(shape, 8, 16))
    body = _in_plane_ellipse(shape, rng.uniform(0.88, 0.97), rng.uniform(0.92, 0.99))
    img[(labels == 0) & ~body[None]] = 0.0  # air
    img += np.float32(rng.uniform(5, 12)) * rng.standard_normal(shape, dtype=np.float32)
    return _to_uint8(img)


def _render_mr(rng: np.random.Generator, labels: np.ndarray, kinds: List[str],
               look: Optional["_Look"] = None) -> np.ndarray:
    shape = labels.shape
    n = len(kinds)
    tissue = rng.uniform(80, 110)
    mean = np.empty(n + 1)
    mean[0] = tissue
    # MR contrast: objects darker or brighter than the surrounding tissue, never the same.
    offsets = rng.uniform(30, 100, size=n) * rng.choice([-1.0, 1.0], size=n)
    mean[1:] = np.clip(tissue + offsets, 20, 230)
    mean[1:][np.array(kinds) == "tube"] = rng.uniform(200, 235)  # flow / contrast
    img = _look_image(rng, labels, mean, look)
    img += _bg_fg(labels, 15.0, 6.0) * _smooth_field(rng, shape, _cells(shape, 6, 16))
    D = shape[0]
    uz = (np.arange(D) + 0.5) / D * 2 - 1
    ry, rx = rng.uniform(0.85, 0.97), rng.uniform(0.8, 0.95)
    _, H, W = shape
    uy = (np.arange(H) + 0.5) / H * 2 - 1
    ux = (np.arange(W) + 0.5) / W * 2 - 1
    outline = ((uz[:, None, None] / 1.1) ** 2 + (uy[None, :, None] / ry) ** 2 + (ux[None, None, :] / rx) ** 2) <= 1
    img[(labels == 0) & ~outline] = 0.0
    img *= np.exp(np.float32(rng.uniform(0.15, 0.35)) * _smooth_field(rng, shape, (3, 3, 3)))  # bias field
    sigma = np.float32(rng.uniform(4, 9))
    real = img + sigma * rng.standard_normal(shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(shape, dtype=np.float32)
    return _to_uint8(np.hypot(real, imag, out=real))  # Rician magnitude


def _render_pet(rng: np.random.Generator, labels: np.ndarray, kinds: List[str],
                look: Optional["_Look"] = None) -> np.ndarray:
    shape = labels.shape
    n = len(kinds)
    mean = np.empty(n + 1)
    mean[0] = rng.uniform(15, 30)
    mean[1:] = rng.uniform(90, 230, size=n)
    img = _look_image(rng, labels, mean, look)
    img *= 1.0 + np.float32(0.3) * _smooth_field(rng, shape, _cells(shape, 8, 8))
    body = _in_plane_ellipse(shape, rng.uniform(0.75, 0.9), rng.uniform(0.8, 0.95))
    img[(labels == 0) & ~body[None]] = 1.0
    img = ndimage.gaussian_filter(img, sigma=float(rng.uniform(0.8, 1.3)), truncate=3.0)  # scanner PSF
    counts_per_unit = rng.uniform(0.25, 0.6)  # low-count acquisition
    img = rng.poisson(img * counts_per_unit).astype(np.float32) / np.float32(counts_per_unit)
    img = ndimage.gaussian_filter(img, sigma=0.6, truncate=3.0)  # reconstruction post-filter
    return _to_uint8(img)


def _render_us(rng: np.random.Generator, labels: np.ndarray, kinds: List[str],
               look: Optional["_Look"] = None) -> np.ndarray:
    shape = labels.shape
    n = len(kinds)
    echo = np.empty(n + 1)
    echo[0] = rng.uniform(100, 130)
    echo[1:] = rng.uniform(20, 55, size=n)  # hypoechoic (cyst, vessel lumen, follicle)
    attenuation = np.zeros(n + 1)
    if n >= 2:  # the second object is a bright, strongly attenuating one that casts a shadow
        echo[2] = rng.uniform(170, 210)
        rows = np.flatnonzero((labels == 2).any(axis=(0, 2)))
        # Spread over its depth so the object keeps most of its own echo and the shadow falls behind it.
        attenuation[2] = rng.uniform(1.0, 1.8) / max(1, rows[-1] - rows[0] + 1)
    img = _look_image(rng, labels, echo, look)
    img *= 1.0 + np.float32(0.2) * _smooth_field(rng, shape, _cells(shape, 10, 8))
    # Specular reflection where the beam (along y) crosses an interface.
    interface = np.zeros(shape, dtype=bool)
    interface[:, 1:, :] = labels[:, 1:, :] != labels[:, :-1, :]
    img[interface] += np.float32(rng.uniform(50, 90))
    mu0 = np.float32(rng.uniform(0.004, 0.012))  # per voxel along the beam
    mu = _lut_image(labels, attenuation) + mu0
    depth_gain = np.exp(np.float32(0.5) * mu0 * np.arange(shape[1], dtype=np.float32))  # partial TGC
    img *= np.exp(-np.cumsum(mu, axis=1)) * depth_gain[None, :, None]
    k = np.float32(rng.uniform(1.2, 2.5))
    speckle = rng.standard_gamma(k, size=shape, dtype=np.float32) / k
    speckle = ndimage.gaussian_filter(speckle, sigma=(0.8, 0.5, 1.2), truncate=2.5)
    speckle /= np.float32(speckle.mean())
    img *= speckle
    return _to_uint8(img)


def _render_microscopy(rng: np.random.Generator, labels: np.ndarray, kinds: List[str],
                       look: Optional["_Look"] = None) -> np.ndarray:
    shape = labels.shape
    n = len(kinds)
    mean = np.empty(n + 1)
    mean[0] = rng.uniform(8, 20)
    mean[1:] = rng.uniform(90, 220, size=n)
    img = _look_image(rng, labels, mean, look)
    img += _bg_fg(labels, 5.0, 30.0) * _smooth_field(rng, shape, _cells(shape, 3, 24))  # chromatin
    img = ndimage.gaussian_filter(img, sigma=(1.4, 0.9, 0.9), truncate=3.0)  # worse axial resolution
    photons = rng.uniform(0.5, 1.5)
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / np.float32(photons)
    img += np.float32(rng.uniform(2, 5)) * rng.standard_normal(shape, dtype=np.float32)  # read noise
    return _to_uint8(img)


_RENDER = {
    "CT": _render_ct,
    "MR": _render_mr,
    "PET": _render_pet,
    "US": _render_us,
    "Microscopy": _render_microscopy,
}


def _spacing_xyz(rng: np.random.Generator, flavour: str) -> Tuple[float, float, float]:
    if flavour == "CT":
        xy, z = rng.uniform(0.6, 0.98), rng.choice([2.5, 3.0, 5.0])
    elif flavour == "MR":
        xy, z = rng.uniform(0.6, 1.2), rng.choice([1.0, 2.0, 3.0, 4.0])
    elif flavour == "PET":
        xy, z = rng.uniform(3.5, 4.2), rng.uniform(2.0, 4.0)
    elif flavour == "US":
        xy = rng.uniform(0.3, 0.8)
        z = xy
    else:
        xy = rng.uniform(0.2, 0.5)
        z = xy * rng.uniform(1.0, 2.0)
    return (round(float(xy), 4), round(float(xy), 4), round(float(z), 4))


# ------------------------------------------------------------------------------------- rich variety

VARIETIES: Tuple[str, ...] = ("basic", "rich")

#: object kinds of the ``rich`` variety (``tube`` and ``blob`` are the basic ones).
RICH_KINDS: Tuple[str, ...] = ("blob", "large", "lobulated", "irregular", "tiny", "thin", "branching")

#: per flavour: relative weights of the lesion-like kinds drawn for the objects that are not blobs.
_RICH_WEIGHTS: Dict[str, Dict[str, float]] = {
    "CT": {"lobulated": 3, "irregular": 3, "tiny": 2, "thin": 2},
    "MR": {"lobulated": 3, "irregular": 3, "tiny": 2, "thin": 2},
    "PET": {"lobulated": 3, "irregular": 2, "tiny": 3},
    "US": {"lobulated": 3, "irregular": 3, "tiny": 1},
    "Microscopy": {"irregular": 3, "lobulated": 2, "tiny": 2},
}


@dataclass
class _RichLayout:
    """Objects of a ``rich`` case before cleaning.

    Attributes:
        labels: (z, y, x) uint8 objects 1..n (overlaps resolved by painting order).
        kinds: kind of object ``k + 1``.
        host: object -> the object it was painted into (lesion in an organ), absent when in background.
        tissue: (z, y, x) uint8 unlabelled tissue patches 1..m, each touching one object.
        tissue_of: patch -> the object it touches.
    """

    labels: np.ndarray
    kinds: List[str]
    host: Dict[int, int]
    tissue: np.ndarray
    tissue_of: Dict[int, int]


def _random_centre(rng: np.random.Generator, labels: np.ndarray, spec: FlavourSpec) -> Tuple[np.ndarray, int]:
    """A lesion centre (z, y, x) voxel and its host: inside an existing object half the time, else anywhere."""
    shape = np.array(labels.shape, dtype=np.float64)
    inside = np.argwhere(labels > 0)
    if inside.size and rng.random() < 0.5:
        centre = inside[int(rng.integers(0, len(inside)))].astype(np.float64)
        return centre, int(labels[tuple(centre.astype(int))])
    u = _sample_centres(rng, 1, spec.region)[0]
    centre = (u + 1.0) / 2.0 * shape - 0.5
    return centre, int(labels[tuple(np.clip(np.rint(centre), 0, shape - 1).astype(int))])


def _blob_mask(blob: _Blob) -> Tuple[Tuple[slice, slice, slice], np.ndarray]:
    """``(slices, mask)``: the blob's bounding box and the (z, y, x) bool mask of its inside there."""
    rho2, scale2 = blob.evaluate()
    return blob.slices, rho2 < scale2


def _half_extent(shape: Shape) -> np.ndarray:
    s = np.array(shape, dtype=np.float64)
    return np.array([s[0], s[1:].min(), s[1:].min()]) / 2.0


def _paint_lesion(rng: np.random.Generator, labels: np.ndarray, label: int, kind: str, spec: FlavourSpec) -> int:
    """Paint one lesion-like object over whatever is there; returns its host (0: background)."""
    shape: Shape = labels.shape  # type: ignore[assignment]
    centre, host = _random_centre(rng, labels, spec)
    half = _half_extent(shape)
    if kind == "tiny":  # a few to a few dozen voxels
        radii = rng.uniform(1.1, 2.4, size=3)
        _stamp(labels, np.rint(centre)[None].astype(np.int64), _ball_offsets(float(radii[1]), float(radii[0])),
               label)
        return host
    size = float(rng.uniform(0.08, 0.22))
    if kind == "lobulated":  # a cluster of 3-6 overlapping lobes
        n_lobes = int(rng.integers(3, 7))
        for _ in range(n_lobes):
            offset = rng.normal(0.0, 0.55, size=3) * size * half
            radii = np.maximum(size * half * rng.uniform(0.45, 0.8, size=3), 1.2)
            radii[1:] = np.sort(radii[1:])[::-1]
            sl, mask = _blob_mask(_Blob.make(rng, centre + offset, radii, 0.15, shape))
            labels[sl][mask] = label
        return host
    # irregular: a rough blob with spicules radiating from it
    radii = np.maximum(size * half * rng.uniform(0.7, 1.2, size=3), 1.5)
    radii[1:] = np.sort(radii[1:])[::-1]
    sl, mask = _blob_mask(_Blob.make(rng, centre, radii, float(rng.uniform(0.5, 0.8)), shape))
    labels[sl][mask] = label
    for _ in range(int(rng.integers(2, 6))):
        direction = rng.normal(size=3)
        direction /= max(np.linalg.norm(direction), 1e-6)
        length = float(rng.uniform(1.3, 2.2)) * radii.max()
        t = np.linspace(0.0, 1.0, max(4, int(2 * length)))[:, None]
        points = np.rint(centre + t * length * direction).astype(np.int64)
        points = points[np.all((points >= 0) & (points < np.array(shape)), axis=1)]
        _stamp(labels, points, _ball_offsets(1.0, 0.6), label)
    return host


def _curve(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
           shape: Shape) -> np.ndarray:
    """(n, 3) voxel points of a gently bending curve from ``start`` along ``direction`` (clipped to the volume)."""
    bend = rng.normal(0.0, 0.35, size=(2, 3))
    ctrl = np.array([start, start + direction * length / 3 + bend[0] * length / 3,
                     start + 2 * direction * length / 3 + bend[1] * length / 3, start + direction * length])
    t = np.linspace(0.0, 1.0, max(8, int(3 * length)))[:, None]
    pts = ((1 - t) ** 3 * ctrl[0] + 3 * (1 - t) ** 2 * t * ctrl[1] + 3 * (1 - t) * t**2 * ctrl[2] + t**3 * ctrl[3])
    pts = np.rint(pts).astype(np.int64)
    inside = np.all((pts >= 0) & (pts < np.array(shape)), axis=1)
    return pts[: int(np.argmin(inside)) if not inside.all() else len(pts)]  # up to where it leaves


def _paint_thin(rng: np.random.Generator, labels: np.ndarray, label: int, kind: str) -> None:
    """A thin curved duct (``thin``, 1-2 voxels wide) or a vessel tree (``branching``: a trunk with 2-5
    thinner branches, each branching point on the trunk)."""
    shape: Shape = labels.shape  # type: ignore[assignment]
    extent = float(np.linalg.norm(shape))
    if kind == "thin":
        start = rng.uniform(0.2, 0.8, size=3) * np.array(shape)
        direction = rng.normal(size=3)
        direction /= max(np.linalg.norm(direction), 1e-6)
        _stamp(labels, _curve(rng, start, direction, float(rng.uniform(0.25, 0.5)) * extent, shape),
               _ball_offsets(float(rng.uniform(0.6, 1.1)), 0.6), label)
        return
    trunk = np.unique(_tube_points(rng, shape, None), axis=0)
    plane = min(shape[1:])
    r = max(1.0, float(rng.uniform(0.015, 0.03)) * plane)
    _stamp(labels, trunk, _ball_offsets(r, max(0.6, r * shape[0] / plane)), label)
    for _ in range(int(rng.integers(2, 6))):
        start = trunk[int(rng.integers(len(trunk) // 5, max(len(trunk) // 5 + 1, 4 * len(trunk) // 5)))]
        direction = rng.normal(size=3)
        direction /= max(np.linalg.norm(direction), 1e-6)
        branch = _curve(rng, start.astype(np.float64), direction, float(rng.uniform(0.15, 0.35)) * extent, shape)
        _stamp(labels, np.vstack([start[None], branch]), _ball_offsets(max(0.8, 0.6 * r), 0.6), label)


def _rich_layout(rng: np.random.Generator, flavour: str, spec: FlavourSpec, shape: Shape, n_objects: int,
                 tree: bool) -> _RichLayout:
    """Draw and paint the objects of a ``rich`` case: organ-like blobs, maybe one large organ (most of the
    volume), lesion-like kinds (lobulated, irregular with spicules, tiny), thin ducts, a branching vessel tree
    (``tree``), and unlabelled tissue patches of the same intensity touching some objects."""
    n_trees = int(tree)
    n_large = int(flavour != "Microscopy" and n_objects - n_trees >= 2 and rng.random() < 0.35)
    n_other = n_objects - n_trees - n_large
    n_blobs = int(rng.integers(0, n_other + 1)) if flavour != "Microscopy" else n_other // 2
    weights = _RICH_WEIGHTS[flavour]
    names = sorted(weights)
    p = np.array([weights[k] for k in names], dtype=np.float64)
    lesions = [names[int(i)] for i in rng.choice(len(names), size=n_other - n_blobs, p=p / p.sum())]

    labels = np.zeros(shape, dtype=np.uint8)
    _paint_blobs(labels, _make_blobs(rng, n_blobs, spec, shape))
    kinds = ["blob"] * n_blobs
    host: Dict[int, int] = {}
    if n_large:
        radii = _half_extent(shape) * rng.uniform(0.8, 1.05, size=3)
        radii[1:] = np.sort(radii[1:])[::-1]
        centre = (np.array(shape, dtype=np.float64) - 1) / 2 + rng.normal(0, 0.05, size=3) * np.array(shape)
        sl, mask = _blob_mask(_Blob.make(rng, centre, radii, 0.25, shape))
        region = labels[sl]
        region[mask & (region == 0)] = len(kinds) + 1  # around the organs already there
        kinds.append("large")
    for kind in lesions:
        kinds.append(kind)
        if kind == "thin":
            _paint_thin(rng, labels, len(kinds), kind)
        else:
            host[len(kinds)] = _paint_lesion(rng, labels, len(kinds), kind, spec)
    if n_trees:
        kinds.append("branching")
        _paint_thin(rng, labels, len(kinds), "branching")
    host = {k: h for k, h in host.items() if h not in (0, k)}

    # Unlabelled tissue of the same intensity, touching about a third of the objects.
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue_of: Dict[int, int] = {}
    for label in range(1, len(kinds) + 1):
        if kinds[label - 1] in ("branching", "large") or rng.random() >= 0.35:
            continue
        box = mask_bbox(labels == label)
        if box is None:
            continue
        lo, hi = np.array([s.start for s in box]), np.array([s.stop - 1 for s in box])  # inclusive
        size = np.maximum((hi - lo + 1) / 2.0, 1.5)
        direction = rng.normal(size=3)
        direction /= max(np.linalg.norm(direction), 1e-6)
        centre = (lo + hi) / 2.0 + direction * size
        radii = size * rng.uniform(0.7, 1.1, size=3)
        radii[1:] = np.sort(radii[1:])[::-1]
        sl, mask = _blob_mask(_Blob.make(rng, centre, radii, 0.3, shape))
        mask &= (labels[sl] == 0) & (tissue[sl] == 0)
        if np.any(mask & ndimage.binary_dilation(labels[sl] == label, structure=np.ones((3, 3, 3), bool))):
            patch = len(tissue_of) + 1  # kept only where it touches its object
            tissue[sl][mask] = patch
            tissue_of[patch] = label
    return _RichLayout(labels, kinds, host, tissue, tissue_of)


def _rich_render(rng: np.random.Generator, flavour: str, layout: _RichLayout, gts: np.ndarray,
                 kept: List[int]) -> np.ndarray:
    """Render a cleaned ``rich`` case: tissue patches as extra render labels after the objects, low contrast
    for some objects, partial-volume edges, then a multiplicative bias field (intensity inhomogeneity)."""
    new_label = {old: new for new, old in enumerate(kept, start=1)}
    n = len(kept)
    render = gts.copy()
    patches = [p for p in sorted(layout.tissue_of) if layout.tissue_of[p] in new_label]
    for i, patch in enumerate(patches, start=n + 1):
        render[(gts == 0) & (layout.tissue == patch)] = i
    kinds = [("tube" if layout.kinds[k - 1] == "branching" else layout.kinds[k - 1]) for k in kept]
    kinds += ["tissue"] * len(patches)
    close_to = {}
    for old, new in new_label.items():
        if layout.kinds[old - 1] != "branching" and rng.random() < 0.3:
            close_to[new] = new_label.get(layout.host.get(old, 0), 0)
    imitates = {i: new_label[layout.tissue_of[p]] for i, p in enumerate(patches, start=n + 1)}
    look = _Look(close_to, imitates, float(rng.uniform(0.5, 1.2)))
    image = _RENDER[flavour](rng, render, kinds, look).astype(np.float32)
    image *= np.exp(np.float32(rng.uniform(0.1, 0.3)) * _smooth_field(rng, gts.shape, (3, 3, 3)))
    return _to_uint8(image)


# ------------------------------------------------------------------------------------------------- API


def generate_case(
    flavour: str,
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    n_objects: Optional[int] = None,
    max_objects: Optional[int] = None,
    with_tube: Optional[bool] = None,
    spacing_xyz: Optional[Sequence[float]] = None,
    variety: str = "basic",
) -> Dict[str, Any]:
    """One synthetic case, as the arrays of a challenge ``.npz`` (what :func:`atomic_savez` takes).

    Args:
        flavour: ``CT``, ``MR``, ``PET``, ``US`` or ``Microscopy`` (case-insensitive).
        seed: everything is drawn from ``np.random.default_rng(seed)``; same seed, same bytes.
        shape: (z, y, x) = (D, H, W), each at least 8.
        n_objects: exact number of objects to draw (a tube counts as one); default: drawn from the
            flavour's range. A few may vanish under their neighbours, so the case may have fewer.
        max_objects: upper bound on the number drawn (ignored when ``n_objects`` is given).
        with_tube: force a tube in or out; default: the flavour's probability (never for microscopy).
        spacing_xyz: override the flavour's random spacing (x, y, z order).
        variety: ``basic`` (the default: blobs and at most one tube; what every seed has always given) or
            ``rich`` (lesion- and CT-like variety, see the module docstring; ``with_tube`` then means a
            branching vessel tree).

    Returns:
        ``{"imgs": (D, H, W) uint8, "spacing": (3,) float64 in (x, y, z) order, "gts": (D, H, W) uint8 with
        labels 1..N}`` plus ``"boxes"`` (object array of the organisers' box dicts, label order, from
        :func:`dcm.protocol.boxes_from_labels`) unless the flavour has no boxes or the case has a tube.
    """
    flavour = canonical_flavour(flavour)
    if variety not in VARIETIES:
        raise ValueError(f"unknown variety {variety!r}; choose from {', '.join(VARIETIES)}")
    spec = FLAVOUR_SPECS[flavour]
    shape_t: Shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise ValueError(f"shape must be 3 sizes (z, y, x), each >= 8; got {tuple(shape)}")
    rng = np.random.default_rng(seed)

    lo, hi = spec.n_objects
    if n_objects is None:
        if max_objects is not None:
            if int(max_objects) < 1:
                raise ValueError(f"max_objects must be >= 1, got {max_objects}")
            hi = min(hi, int(max_objects))
            lo = min(lo, hi)
        n_objects = int(rng.integers(lo, hi + 1))
    else:
        n_objects = int(n_objects)
        rng.integers(lo, hi + 1)  # drawn anyway: the tube and spacing draws stay those of the default path
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    tube_draw = bool(rng.random() < spec.tube_probability)
    tube = tube_draw if with_tube is None else bool(with_tube)
    spacing = _spacing_xyz(rng, flavour)
    if spacing_xyz is not None:
        spacing = tuple(float(s) for s in spacing_xyz)  # type: ignore[assignment]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing_xyz must be 3 positive numbers, got {spacing_xyz}")

    if variety == "rich":
        layout = _rich_layout(rng, flavour, spec, shape_t, n_objects, tree=tube)
        gts, kept = _clean_labels(layout.labels)
        image = _rich_render(rng, flavour, layout, gts, kept)
        boxed = spec.has_boxes and bool(kept) and all(layout.kinds[k - 1] != "branching" for k in kept)
        return case_to_arrays(image, spacing, boxes=boxes_from_labels(gts) if boxed else None, gts=gts)

    labels = np.zeros(shape_t, dtype=np.uint8)
    n_blobs = n_objects - int(tube)
    _paint_blobs(labels, _make_blobs(rng, n_blobs, spec, shape_t))
    if tube:
        # CT vessels run head to foot (along z), like the aorta; elsewhere any direction.
        _paint_tube(rng, labels, n_blobs + 1, axis=0 if flavour == "CT" else None)
    gts, kept = _clean_labels(labels)
    kinds = ["tube" if k > n_blobs else "blob" for k in kept]

    image = _RENDER[flavour](rng, gts, kinds)
    boxes = boxes_from_labels(gts) if spec.has_boxes and "tube" not in kinds and kept else None
    return case_to_arrays(image, spacing, boxes=boxes, gts=gts)


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset generated with ``seed`` (independent streams per case)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def generate_dataset(
    out_dir: Union[str, Path],
    n_cases: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    flavours: Sequence[str] = FLAVOURS,
    max_objects: Optional[int] = None,
    n_objects: Optional[int] = None,
    progress: bool = True,
    variety: str = "basic",
) -> List[Path]:
    """Write ``n_cases`` cases ``<FLAVOUR>_synthetic_<idx:04d>.npz`` to ``out_dir`` (atomically).

    Case ``idx`` has flavour ``flavours[idx % len(flavours)]`` and seed :func:`case_seed` ``(seed, idx)``.

    Returns:
        The written paths, in index order.
    """
    from tqdm import tqdm

    names = [canonical_flavour(f) for f in flavours]
    if not names:
        raise ValueError("no flavours given")
    out = Path(out_dir)
    paths = []
    for idx in tqdm(range(int(n_cases)), desc="synthetic cases", unit="case", disable=not progress):
        flavour = names[idx % len(names)]
        arrays = generate_case(flavour, case_seed(seed, idx), shape=shape, n_objects=n_objects,
                               max_objects=max_objects, variety=variety)
        paths.append(atomic_savez(out / f"{flavour}_synthetic_{idx:04d}.npz", **arrays))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dcm.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--cases", type=int, default=len(FLAVOURS), help="number of cases (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"),
                   help="(z, y, x) size, default %(default)s")
    p.add_argument("--flavours", default=",".join(FLAVOURS),
                   help="comma-separated, used in turn (default: %(default)s)")
    p.add_argument("--max-objects", type=int, default=None, help="at most K objects per case")
    p.add_argument("--objects", type=int, default=None, help="exactly N objects per case (before vanishing)")
    p.add_argument("--variety", choices=VARIETIES, default="basic",
                   help="basic: blobs and tubes (default); rich: lesion- and CT-like variety (see the docs)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        flavours = [canonical_flavour(f) for f in args.flavours.split(",") if f.strip()]
        paths = generate_dataset(args.out, args.cases, args.seed, tuple(args.shape), flavours,
                                 max_objects=args.max_objects, n_objects=args.objects,
                                 progress=not args.no_progress, variety=args.variety)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
