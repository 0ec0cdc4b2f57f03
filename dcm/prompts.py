"""The one representation of what a user gives per object: a box and clicks.

Ground floor of DCM (imports nothing of DCM): case files (:mod:`dcm.data.cases`), the protocol
(:mod:`dcm.protocol`), the evaluator, the engine, the session, the experts and the trainers all speak of
prompts with these types.

Conventions:

* voxel coordinates are integer ``(z, y, x)`` indices (:data:`ZYX`), the array-axis order of every volume;
* a :class:`Box` is the challenge's box: inclusive bounds, the y / x extent drawn on slice ``z_mid`` only;
* a :class:`Click` is one voxel and its sign; an object's clicks are kept in the order they were given;
* object ``i`` of a case is label ``i + 1`` (:attr:`ObjectPrompts.label`).

The box-centre click rule (an object with a box but no click yet is treated as clicked at its box centre)
lives here too: :func:`box_center`, :func:`box_center_click` and, for the global expert's training frame,
:func:`box_center_in_frame`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ZYX",
    "BOX_KEYS",
    "Box",
    "Click",
    "ObjectPrompts",
    "parse_voxel",
    "box_center",
    "box_center_click",
    "box_center_in_frame",
    "ball_offsets",
]

#: An integer voxel index, (z, y, x).
ZYX = Tuple[int, int, int]

#: The keys of a challenge box dict, in the organisers' order.
BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")


@dataclass(frozen=True)
class Box:
    """The challenge box of one object (all bounds inclusive voxel indices).

    ``z_min`` / ``z_max`` are the object's extreme slices; the y / x extent is the 2D box drawn on slice
    ``z_mid`` only (the organisers' rule), so it may not cover the object on other slices.
    """

    z_min: int
    z_max: int
    z_mid: int
    z_mid_x_min: int
    z_mid_y_min: int
    z_mid_x_max: int
    z_mid_y_max: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Box":
        """The box of a challenge dict (keys :data:`BOX_KEYS`; integer-valued numbers of any type).

        Raises:
            ValueError: a key is missing or a value is not an integer (one line).
        """
        missing = [k for k in BOX_KEYS if k not in d]
        if missing:
            raise ValueError(f"missing keys {missing}")
        values = {}
        for k in BOX_KEYS:
            v = d[k]
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{k}={v!r} is not a number") from None
            if not np.isfinite(fv) or fv != int(fv):
                raise ValueError(f"{k}={v!r} is not an integer")
            values[k] = int(fv)
        return cls(**values)

    def to_dict(self) -> Dict[str, int]:
        """The challenge dict (keys :data:`BOX_KEYS`, Python ints)."""
        return {k: int(getattr(self, k)) for k in BOX_KEYS}

    @property
    def bounds_zyx(self) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
        """``((z_min, z_max), (y_min, y_max), (x_min, x_max))``, inclusive."""
        return (
            (self.z_min, self.z_max),
            (self.z_mid_y_min, self.z_mid_y_max),
            (self.z_mid_x_min, self.z_mid_x_max),
        )

    @property
    def size_zyx(self) -> Tuple[int, int, int]:
        """Voxels along ``(z, y, x)`` (bounds inclusive)."""
        return tuple(hi - lo + 1 for lo, hi in self.bounds_zyx)  # type: ignore[return-value]

    @property
    def center_zyx(self) -> Tuple[float, float, float]:
        """Mean of min and max per axis, ``(z, y, x)`` (may be a half-integer): :func:`box_center`."""
        return box_center(self)

    def problem(self, shape: Sequence[int]) -> Optional[str]:
        """A one-line description of what is wrong with the box for a volume of ``shape``, or None."""
        for (lo, hi), n, axis in zip(self.bounds_zyx, shape, "zyx"):
            if lo > hi:
                return f"inverted along {axis} ({lo} > {hi})"
            if lo < 0 or hi >= n:
                return f"{axis} range [{lo}, {hi}] outside the image (size {n})"
        if not self.z_min <= self.z_mid <= self.z_max:
            return f"z_mid={self.z_mid} outside [z_min, z_max]=[{self.z_min}, {self.z_max}]"
        return None


@dataclass(frozen=True)
class Click:
    """One click: voxel ``(z, y, x)`` and whether it is a foreground (positive) click."""

    zyx: ZYX
    positive: bool

    @property
    def kind(self) -> str:
        """``'fg'`` / ``'bg'``, as the challenge's ``clicks`` / ``clicks_order`` name it."""
        return "fg" if self.positive else "bg"


@dataclass
class ObjectPrompts:
    """Everything the user gave for one object.

    Attributes:
        label: the object's label in ``segs`` (object index + 1).
        box: its box, or None (no-box cases).
        clicks: all clicks in the order they were given.
        problem: a one-line reason when this object's prompts are unusable (the object then keeps its
            previous mask), else None.
    """

    label: int
    box: Optional[Box] = None
    clicks: List[Click] = field(default_factory=list)
    problem: Optional[str] = None

    @property
    def fg_clicks(self) -> List[ZYX]:
        """The (z, y, x) voxels of the positive clicks, in order."""
        return [c.zyx for c in self.clicks if c.positive]

    @property
    def bg_clicks(self) -> List[ZYX]:
        """The (z, y, x) voxels of the negative clicks, in order."""
        return [c.zyx for c in self.clicks if not c.positive]

    @property
    def last_click(self) -> Optional[Click]:
        return self.clicks[-1] if self.clicks else None

    @property
    def has_prompt(self) -> bool:
        return self.box is not None or bool(self.clicks)


def parse_voxel(p: Any, shape: Sequence[int], what: str = "click") -> ZYX:
    """An integer (z, y, x) voxel index inside ``shape``.

    Raises:
        ValueError: not 3 coordinates, not integers, or outside the image (one line).
    """
    try:
        arr = np.asarray(p, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {p!r} is not 3 numbers (z, y, x)") from None
    if arr.size != 3:
        raise ValueError(f"{what} {p!r} must have 3 coordinates (z, y, x)")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise ValueError(f"{what} {arr.tolist()} is not an integer voxel index")
    zyx = tuple(int(v) for v in arr)
    if any(c < 0 or c >= n for c, n in zip(zyx, shape)):
        raise ValueError(f"{what} {list(zyx)} outside the image of shape {tuple(shape)}")
    return zyx  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the box-centre click rule


def box_center(box: Box, to_voxel: bool = False) -> Union[Tuple[float, float, float], ZYX]:
    """The centre of a box, ``(z, y, x)``: per axis the mean of its inclusive min and max.

    Args:
        box: the box.
        to_voxel: False: the exact centre ``(lo + hi) / 2.0`` (floats, a half-integer where ``lo + hi`` is
            odd): the global expert's RoI centre and its first point. True: the voxel holding it,
            ``(lo + hi) // 2`` (ints, rounded down): where the local expert and the engine click. For a box
            inside the image (non-negative bounds, as every validated box) this equals ``int()`` of the exact
            centre.
    """
    if to_voxel:
        return tuple((int(lo) + int(hi)) // 2 for lo, hi in box.bounds_zyx)  # type: ignore[return-value]
    return tuple((lo + hi) / 2.0 for lo, hi in box.bounds_zyx)  # type: ignore[return-value]


def box_center_click(box: Box) -> Click:
    """The click a box stands for while its object has no click yet: positive, at its centre voxel
    (:func:`box_center` with ``to_voxel``)."""
    return Click(box_center(box, to_voxel=True), True)  # type: ignore[arg-type]


def box_center_in_frame(frame_size: int) -> ZYX:
    """Where the box-centre click lies in the global expert's RoI frame of ``frame_size`` voxels per axis.

    The RoI is centred at the box centre, which it maps to frame voxel ``frame_size // 2 - 1`` on every
    axis ((31, 31, 31) for 64; :class:`dcm.experts.roi.GlobalRoI` puts it at ``frame_size / 2 - 1``, the
    same for the even frame sizes used). The global expert's trainer clicks there (its crops are RoIs).
    """
    c = int(frame_size) // 2 - 1
    return (c, c, c)


def ball_offsets(radius: float) -> np.ndarray:
    """(m, 3) int64 (z, y, x) offsets of the voxels within Euclidean ``radius`` of a voxel, in C order (radius
    1: it and its 6 face neighbours; 0: the voxel alone): a click's neighbourhood of that radius."""
    r = int(np.floor(radius))
    grid = np.indices((2 * r + 1,) * 3, dtype=np.int64).reshape(3, -1).T - r
    return grid[(grid ** 2).sum(axis=1) <= float(radius) ** 2 + 1e-9]
