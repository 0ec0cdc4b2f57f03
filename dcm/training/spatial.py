"""Random spatial augmentation of the global-RoI crops as the released recipe drew it (torchio), seeded by MONAI.

* :class:`RandBSplineElasticd`: torchio's ``RandomElasticDeformation``: a coarse grid of control points with
  displacements ~ U(-max, max) voxels per axis, the ``locked_borders`` outermost control points of each side
  held at zero, interpolated to every voxel by a cubic B-spline, guarded against folding.
* :class:`RandZoomTranslated`: torchio's ``RandomAffine(scales, degrees=0, translation)``: an image zoom per
  axis ~ U(1 - s, 1 + s) about the centre (or its inverse, the draw of MONAI's ``RandAffine``) and a shift
  ~ U(-t, t) voxels.

Both are MONAI ``RandomizableTransform`` s, so a ``Compose``'s ``set_random_state(seed)`` makes every draw a
function of that seed (the dataset seeds it from (seed, epoch, index)). Arrays are (C, z, y, x) and every
per-axis value is (z, y, x). Images are resampled trilinearly, labels by nearest neighbour.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, RandomizableTransform

from dcm.errors import ConfigError
from dcm.training.config_schema import ZOOM_DRAWS

__all__ = ["bspline_weights", "bspline_field", "jacobian_determinant", "RandBSplineElasticd",
           "RandZoomTranslated", "ZOOM_DRAWS"]

_SPLINE_ORDER = 3


def _cubic_bspline(u: torch.Tensor, derivative: bool = False) -> torch.Tensor:
    """The centred uniform cubic B-spline (support (-2, 2)) or its derivative, elementwise."""
    a = u.abs()
    if derivative:
        inner = -2.0 * u + 1.5 * u * a
        outer = -torch.sign(u) * (2.0 - a) ** 2 / 2.0
    else:
        inner = 2.0 / 3.0 - u ** 2 + a ** 3 / 2.0
        outer = (2.0 - a) ** 3 / 6.0
    return torch.where(a < 1, inner, torch.where(a < 2, outer, torch.zeros_like(u)))


def bspline_weights(size: int, control_points: int, derivative: bool = False) -> torch.Tensor:
    """(size, control_points) float64 weights of each control point at each voxel of one axis.

    The geometry of ITK's ``BSplineTransformInitializer`` (what torchio uses): the mesh of
    ``control_points - 3`` intervals spans the image's extent, from the outer face of voxel 0 (-0.5) to that
    of voxel ``size - 1`` (``size - 0.5``), so the grid spacing is ``size / (control_points - 3)`` voxels and
    control point ``j`` sits at ``-0.5 + (j - 1) * spacing``: the first and the last lie outside the image.
    With ``derivative`` the weights give d/dvoxel of the interpolated field.
    """
    if control_points <= _SPLINE_ORDER:
        raise ConfigError(f"data.augment.elastic.control_points must be > {_SPLINE_ORDER}, got {control_points}")
    spacing = size / (control_points - _SPLINE_ORDER)
    t = (torch.arange(size, dtype=torch.float64) + 0.5) / spacing + 1.0  # voxel position in control-point units
    u = t[:, None] - torch.arange(control_points, dtype=torch.float64)[None, :]
    weights = _cubic_bspline(u, derivative)
    return weights / spacing if derivative else weights


def bspline_field(coarse: torch.Tensor, shape: Sequence[int], derivative_axis: int = -1) -> torch.Tensor:
    """The dense displacement field (3, z, y, x) of a coarse (3, nz, ny, nx) control grid, in voxels.

    ``derivative_axis`` 0 / 1 / 2 gives instead the field's derivative along z / y / x (d field / d voxel).
    """
    mz, my, mx = [bspline_weights(int(s), int(n), derivative=(axis == derivative_axis)).float()
                  for axis, (s, n) in enumerate(zip(shape, coarse.shape[1:]))]
    field = torch.einsum("xk,aijk->aijx", mx, coarse.float())  # one axis at a time (separable)
    field = torch.einsum("yj,aijx->aiyx", my, field)
    return torch.einsum("zi,aiyx->azyx", mz, field)


def jacobian_determinant(coarse: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """det(I + d field / d voxel) at every voxel (z, y, x) of the map voxel -> voxel + field(voxel).

    Exact (analytic B-spline derivatives) at voxel centres; > 0 everywhere means the warp does not fold there.
    """
    g = torch.stack([bspline_field(coarse, shape, derivative_axis=b) for b in range(3)], dim=1)  # (3, 3, ...)
    g = g + torch.eye(3, dtype=g.dtype).view(3, 3, 1, 1, 1)
    return (g[0, 0] * (g[1, 1] * g[2, 2] - g[1, 2] * g[2, 1]) - g[0, 1] * (g[1, 0] * g[2, 2] - g[1, 2] * g[2, 0])
            + g[0, 2] * (g[1, 0] * g[2, 1] - g[1, 1] * g[2, 0]))


def _plain(x: Any) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


def _resample(volume: Any, coords: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``volume`` (C, z, y, x) sampled at voxel coordinates ``coords`` (3, z, y, x) (z, y, x order)."""
    vol = _plain(volume)
    shape = torch.tensor(vol.shape[1:], dtype=torch.float64).view(3, 1, 1, 1)
    norm = (2.0 * coords / (shape - 1) - 1.0).flip(0).permute(1, 2, 3, 0)  # (z, y, x, 3) as (x, y, z)
    out = F.grid_sample(vol[None].float(), norm[None].float(), mode=mode, padding_mode=padding_mode,
                        align_corners=True)[0]
    return out.to(vol.dtype)


class _RandWarpd(RandomizableTransform, MapTransform):
    """Resample ``image`` / ``label`` (C, z, y, x) at randomly drawn voxel coordinates (subclasses draw them)."""

    def __init__(self, keys: Sequence[str], prob: float, padding_mode: str,
                 modes: Sequence[str] = ("bilinear", "nearest")) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.modes = tuple(modes)
        self.padding_mode = str(padding_mode)

    def draw_coordinates(self, shape: Tuple[int, int, int]) -> torch.Tensor:  # subclass
        """Voxel (z, y, x) sampling coordinates (3, z, y, x), drawn from ``self.R``."""
        raise NotImplementedError

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shape = tuple(int(s) for s in _plain(d[self.keys[0]]).shape[1:])
        coords = self.draw_coordinates(shape)  # type: ignore[arg-type]
        for key, mode in zip(self.keys, self.modes):
            d[key] = _resample(d[key], coords, mode, self.padding_mode)
        return d


class RandBSplineElasticd(_RandWarpd):
    """torchio's ``RandomElasticDeformation`` (see the module docstring), with a fold guard.

    Args:
        control_points: per axis, borders included (released 7; torchio needs > 3).
        locked_borders: the outermost control points per side held at zero displacement (released 2).
        locked_axes: the (z, y, x) axes whose borders are locked. torchio's code locks its first two array
            axes only, which are (z, y) of the released crops: released [0, 1].
        max_displacement: voxels, each control displacement ~ U(-max, max) per axis (released 7.5). It must
            stay below half the grid spacing (torchio's limit: beyond it folding is likely).
        min_jacobian: the fold guard: while the Jacobian determinant of the warp falls to this value or below
            at some voxel, the drawn control displacements are multiplied by ``shrink`` (deterministic; torchio
            only warns about folding). 0 < ``shrink`` < 1.
    """

    def __init__(self, keys: Sequence[str], size: int, prob: float = 1.0, control_points: int = 7,
                 locked_borders: int = 2, locked_axes: Sequence[int] = (0, 1), max_displacement: float = 7.5,
                 padding_mode: str = "border", min_jacobian: float = 0.05, shrink: float = 0.5) -> None:
        super().__init__(keys, prob, padding_mode)
        self.size = int(size)
        self.control_points = int(control_points)
        self.locked_borders = int(locked_borders)
        self.locked_axes = tuple(int(a) for a in locked_axes)
        self.max_displacement = float(max_displacement)
        self.min_jacobian = float(min_jacobian)
        self.shrink = float(shrink)
        where = "data.augment.elastic"
        spacing = self.size / (self.control_points - _SPLINE_ORDER) if self.control_points > _SPLINE_ORDER else 0
        if spacing <= 0:
            raise ConfigError(f"{where}.control_points must be > {_SPLINE_ORDER}, got {self.control_points}")
        if not 0 <= 2 * self.locked_borders < self.control_points:
            raise ConfigError(f"{where}: 2 * locked_borders must be < control_points, got {self.locked_borders} "
                              f"and {self.control_points}")
        if not set(self.locked_axes) <= {0, 1, 2}:
            raise ConfigError(f"{where}.locked_axes: (z, y, x) axes 0, 1, 2, got {list(self.locked_axes)}")
        if not 0 <= self.max_displacement < spacing / 2:
            raise ConfigError(f"{where}.max_displacement must be in [0, {spacing / 2:g}) (half the grid spacing "
                              f"{spacing:g} of {self.control_points} control points over {self.size} voxels), "
                              f"got {self.max_displacement}")
        if not 0 <= self.min_jacobian < 1 or not 0 < self.shrink < 1:
            raise ConfigError(f"{where}: min_jacobian in [0, 1) and shrink in (0, 1), got {self.min_jacobian}, "
                              f"{self.shrink}")
        #: the last drawn control grid (3, n, n, n), after the fold guard (tests, figures).
        self.last_coarse: torch.Tensor = torch.zeros(3, *(self.control_points,) * 3, dtype=torch.float64)

    def draw_coarse(self) -> torch.Tensor:
        """A control grid (3, n, n, n) (displacement components z, y, x) from ``self.R``, borders locked."""
        n = self.control_points
        coarse = torch.from_numpy(self.R.uniform(-1.0, 1.0, size=(3, n, n, n))) * self.max_displacement
        lock = self.locked_borders
        for axis in self.locked_axes:
            index = [slice(None)] * 4
            for i in list(range(lock)) + list(range(n - lock, n)):
                index[axis + 1] = i  # type: ignore[call-overload]
                coarse[tuple(index)] = 0.0
        return coarse

    def draw_coordinates(self, shape: Tuple[int, int, int]) -> torch.Tensor:
        if any(s != self.size for s in shape):
            raise ValueError(f"RandBSplineElasticd built for {self.size}^3, got {shape}")
        coarse = self.draw_coarse()
        for _ in range(64):  # each pass scales the Jacobian's deviation from I by shrink
            if float(jacobian_determinant(coarse, shape).min()) > self.min_jacobian:
                break
            coarse = coarse * self.shrink
        self.last_coarse = coarse
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
        return grid + bspline_field(coarse, shape)


class RandZoomTranslated(_RandWarpd):
    """Zoom about the centre and shift, per (z, y, x) axis: torchio's ``RandomAffine(scales, translation)``.

    Args:
        scales: s per axis; ``zoom_draw`` ``scale`` draws the image zoom f ~ U(1 - s, 1 + s) (f > 1 enlarges
            the content, torchio, released), ``inverse`` draws 1 / f from it (MONAI ``RandAffine``).
        translation: t per axis, the shift ~ U(-t, t) voxels.
        padding_mode: ``zeros`` (released: torchio's ``default_pad_value=0``), ``border``, ``reflection``.
    """

    def __init__(self, keys: Sequence[str], prob: float = 1.0, scales: Sequence[float] = (0.2, 0.5, 0.5),
                 translation: Sequence[float] = (4.0, 4.0, 4.0), zoom_draw: str = "scale",
                 padding_mode: str = "zeros") -> None:
        super().__init__(keys, prob, padding_mode)
        if zoom_draw not in ZOOM_DRAWS:
            raise ConfigError(f"data.augment.affine.zoom_draw: one of {ZOOM_DRAWS}, got {zoom_draw!r}")
        self.scales = np.asarray([float(s) for s in scales], dtype=np.float64)
        self.translation = np.asarray([float(t) for t in translation], dtype=np.float64)
        if self.scales.shape != (3,) or self.translation.shape != (3,) or not (0 <= self.scales).all() \
                or not (self.scales < 1).all():
            raise ConfigError(f"data.augment.affine: scales (3 values in [0, 1)) and translation (3 values), "
                              f"got {list(scales)} and {list(translation)}")
        self.zoom_draw = zoom_draw
        #: the last drawn image zoom and shift per (z, y, x) axis.
        self.last_zoom = np.ones(3)
        self.last_shift = np.zeros(3)

    def draw_coordinates(self, shape: Tuple[int, int, int]) -> torch.Tensor:
        factor = self.R.uniform(1.0 - self.scales, 1.0 + self.scales)
        self.last_zoom = factor if self.zoom_draw == "scale" else 1.0 / factor
        self.last_shift = self.R.uniform(-self.translation, self.translation)
        axes = []
        for s, zoom, shift in zip(shape, self.last_zoom, self.last_shift):
            centre = (s - 1) / 2.0
            axes.append(centre + (torch.arange(s, dtype=torch.float64) - centre) / zoom - shift)
        return torch.stack(torch.meshgrid(*axes, indexing="ij"))
