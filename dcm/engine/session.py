"""An interactive session for viewers and scripts, shaped like nnInteractive's.

    session = dcm.InteractiveSession(config="configs/dcm_small.yaml", weights="weights/dcm_small.pt")
    session.set_image("ct.nii.gz")                 # or a (z, y, x) array with spacing=(z, y, x)
    liver = session.new_object()
    mask = session.add_box(liver, {"z_min": 40, "z_max": 90, "z_mid": 65, "z_mid_x_min": 200, ...})
    mask = session.add_point(liver, (70, 250, 300), positive=False)
    session.undo(liver)                            # several levels
    session.save("liver.nii.gz")                   # the label map on the input's grid and geometry

Each interaction runs the same per-object step as ``predict.sh`` (routing, RoI update, overlap rule) and
returns that object's (z, y, x) boolean mask; ``last_changed_region`` holds the slices a viewer must redraw.
The experts cache image embeddings, so a further click on the same object is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dcm.data.cases import MAX_OBJECTS, Case, validate_image, validate_spacing
from dcm.engine.clicks import ClickPromise, ClickProtection, promises_of
from dcm.engine.fusion import FusedPrediction, LabelWriter
from dcm.engine.predictor import DCMPredictor, predict_object
from dcm.errors import CaseError
from dcm.experts.base import Expert
from dcm.prompts import BOX_KEYS, Box, Click, ObjectPrompts, parse_voxel
from dcm.regions import mask_bbox

__all__ = ["InteractiveSession"]


@dataclass
class _Write:
    """One interaction as the label writer applied it: replaying the writes still in the log, in order, on
    the folded base gives the label map, so an undo drops one write and replays the rest."""

    label: int
    prompts_before: ObjectPrompts
    fused: Optional[FusedPrediction]
    promises: Dict[int, ClickPromise]

    @property
    def region(self) -> Tuple[slice, ...]:
        return self.fused.region if self.fused is not None else (slice(0, 0),) * 3


def _integer(value: Any, field_name: str, what: str = "") -> int:
    """``value`` as an int when it is an integer (Python or NumPy, not a bool); CaseError otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise CaseError(None, field_name, f"{what}{value!r} is not an integer")
    return int(value)


class InteractiveSession:
    """Stateful interactive segmentation of one image with several objects.

    Args:
        config: a YAML path / preset name or a config dict (sections ``engine``, ``global_expert``,
            ``local_expert``, ``session``; :mod:`dcm.config_schema`). None: ``configs/dcm.yaml`` when
            ``weights`` are given; with no weights either, the small CPU preset ``configs/dcm_small.yaml`` and
            its bundled ``weights/dcm_small.pt`` (one stderr line says so).
        weights: a combined DCM checkpoint (both experts), or None to use the paths in the config.
        experts: already built experts (bypasses the model part of ``config`` and ``weights``; tests, tools).
        max_undo: undo levels kept per object.

    The whole config is checked before any model is built; the engine section once, by the session's
    :class:`~dcm.engine.predictor.DCMPredictor` (:attr:`predictor`), whose checked config the session uses.
    """

    def __init__(
        self,
        config: Union[str, Path, Dict[str, Any], None] = None,
        weights: Optional[Union[str, Path]] = None,
        experts: Optional[Dict[str, Expert]] = None,
        device: Optional[str] = None,
        max_undo: int = 20,
    ):
        if experts is None:
            from dcm.config import pick_config
            from dcm.experts import build_experts_from_config

            config = pick_config(config, weights, how_to_pass="config='dcm', weights='FILE'")
            cfg, experts = build_experts_from_config(config, weights, device)
        else:
            from dcm.config import load_config
            from dcm.config_schema import check_dcm_config

            cfg = check_dcm_config(load_config(config if config is not None else {}))
        engine = dict(cfg["engine"])
        if cfg["session"]["no_overlap"]:
            engine["overlap"] = "keep_others"
        #: the engine step the session shares with predict.sh; its ``cfg`` is the one checked engine config
        self.predictor = DCMPredictor(experts, engine)
        self.engine_cfg: Dict[str, Any] = self.predictor.cfg
        self.experts = experts
        self.max_undo = max_undo
        self.image: Optional[np.ndarray] = None
        self.geometry = None
        self.spacing_zyx: Tuple[float, float, float] = (1.0, 1.0, 1.0)
        self.segs: Optional[np.ndarray] = None
        self.objects: Dict[int, ObjectPrompts] = {}
        self._log: List[_Write] = []  # the writes that can still be undone (and those after them), in order
        self._base: Optional[np.ndarray] = None  # the label map before the first write of the log
        self._undoable: Dict[int, int] = {}  # per object: how many of its last writes can be undone
        self.last_changed_region: Optional[Tuple[slice, ...]] = None

    # -------------------------------------------------------------------------------------- image
    def set_image(self, image: Union[np.ndarray, str, Path], spacing: Optional[Sequence[float]] = None) -> None:
        """Set the (z, y, x) image (array, or a NIfTI / any SimpleITK-readable path, whose geometry is kept).

        Args:
            image: array or path.
            spacing: (z, y, x) voxel size in mm for an array (default 1 mm); ignored for a path.

        A boolean image is taken as 0 / 255 uint8 (a binary volume to segment further), as in case files.

        Raises:
            CaseError: (a ValueError) a one-line reason naming ``image`` or ``spacing``: not 3D, empty, not
                numeric, NaN / inf values; spacing not 3 finite values > 0. Nothing changes then: the previous
                image, objects and masks stay as they were.
        """
        if isinstance(image, (str, Path)):
            from dcm.data.nifti import read_nifti

            array, geometry = read_nifti(image)
            where: Optional[Union[str, Path]] = image
            spacing_zyx = validate_spacing(geometry.spacing_xyz[::-1], image, order="z, y, x")
        else:
            array, geometry, where = np.asarray(image), None, None
            spacing_zyx = validate_spacing((1.0, 1.0, 1.0) if spacing is None else spacing, None, order="z, y, x")
        array = validate_image(array, where, "image")
        try:
            for expert in self.experts.values():
                expert.set_image(array, spacing_zyx)
        except Exception:
            if self.image is not None:  # put every expert back on the image the session still holds
                for expert in self.experts.values():
                    expert.set_image(self.image, self.spacing_zyx)
            raise
        self.geometry, self.spacing_zyx = geometry, spacing_zyx
        self.image = array
        self.segs = np.zeros(array.shape, dtype=np.uint8)
        self.objects.clear()
        self._clear_log()

    def _need_image(self) -> None:
        if self.image is None:
            raise RuntimeError("An image must be set with .set_image(...) before adding interactions.")

    def _need_object(self, obj: int) -> ObjectPrompts:
        self._need_image()
        if obj not in self.objects:
            raise KeyError(f"no object {obj}; create one with .new_object()")
        return self.objects[obj]

    # -------------------------------------------------------------------------------------- objects
    def new_object(self) -> int:
        """Create an empty object; returns its label (1, 2, ...; the lowest free one)."""
        self._need_image()
        label = next((i for i in range(1, MAX_OBJECTS + 1) if i not in self.objects), None)
        if label is None:
            raise CaseError(None, "objects", f"at most {MAX_OBJECTS} objects (uint8 label map)")
        self.objects[label] = ObjectPrompts(label=label)
        self._undoable[label] = 0
        return label

    def mask(self, obj: int) -> np.ndarray:
        """The object's current (z, y, x) boolean mask."""
        self._need_object(obj)
        return self.segs == obj

    def labels(self) -> np.ndarray:
        """The (z, y, x) uint8 label map of all objects."""
        self._need_image()
        return self.segs.copy()

    def add_box(self, obj: int, box: Mapping[str, int]) -> np.ndarray:
        """Set the object's box (challenge keys, inclusive) and segment; returns the object's mask.

        Raises:
            CaseError: (a ValueError) ``box: ...`` when a key is missing, not an integer, inverted or outside.
        """
        prompts = self._need_object(obj)
        if not isinstance(box, Mapping):
            raise CaseError(None, "box", f"expected a mapping of {list(BOX_KEYS)}, got {type(box).__name__}")
        for key in BOX_KEYS:
            if key in box:
                _integer(box[key], "box", f"{key}=")
        try:
            parsed = Box.from_dict(box)
        except (TypeError, ValueError) as e:
            raise CaseError(None, "box", str(e)) from None
        problem = parsed.problem(self.image.shape)
        if problem:
            raise CaseError(None, "box", problem)
        return self._interact(obj, replace(prompts, box=parsed))

    def add_point(self, obj: int, zyx: Sequence[int], positive: bool = True) -> np.ndarray:
        """Add a click at voxel (z, y, x); returns the object's mask.

        Raises:
            CaseError: (a ValueError) ``point: ...`` when not 3 integers (bools are not integers) or outside the
                image; ``positive: ...`` when ``positive`` is not a bool.
        """
        prompts = self._need_object(obj)
        if not isinstance(positive, (bool, np.bool_)):
            raise CaseError(None, "positive", f"must be True or False, got {positive!r}")
        if isinstance(zyx, (str, bytes)) or not isinstance(zyx, Sequence) and not isinstance(zyx, np.ndarray):
            raise CaseError(None, "point", f"expected 3 integers (z, y, x), got {zyx!r}")
        for c in zyx:
            _integer(c, "point")
        try:
            point = parse_voxel(zyx, self.image.shape, "voxel")
        except ValueError as e:
            raise CaseError(None, "point", str(e)) from None
        return self._interact(obj, replace(prompts, clicks=prompts.clicks + [Click(point, bool(positive))]))

    def undo(self, obj: int) -> np.ndarray:
        """Revert the object's last interaction (prompts and mask); returns its mask.

        The label map becomes what it would be had that interaction never happened, every other interaction
        kept: other objects' masks change only where the undone one had taken voxels from them.
        """
        self._need_object(obj)
        if not self._undoable[obj]:
            raise IndexError(f"nothing to undo for object {obj}")
        index = max(i for i, w in enumerate(self._log) if w.label == obj)
        undone = self._log.pop(index)
        self._undoable[obj] -= 1
        self.objects[obj] = undone.prompts_before
        self._replay()
        self.last_changed_region = undone.region
        return self.mask(obj)

    def remove(self, obj: int) -> None:
        """Delete the object: its mask, and its interactions (other objects get back what they took)."""
        self._need_object(obj)
        self._log = [w for w in self._log if w.label != obj]
        for write in self._log:  # its clicks no longer keep other objects off their voxels
            write.promises.pop(obj, None)
        self._base[self._base == obj] = 0
        del self.objects[obj]
        del self._undoable[obj]
        self._replay()

    def reset(self) -> None:
        """Remove every object (the image and its cached embeddings stay)."""
        self._need_image()
        self.segs[:] = 0
        self.objects.clear()
        self._clear_log()
        for expert in self.experts.values():
            expert.reset()
            expert.set_image(self.image, self.spacing_zyx)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the label map, on the input's grid and geometry when the image came from a file.

        Raises:
            OutputError: (a DCMError) one line naming ``path`` when it cannot be written (a folder, a path
                under a file, a read-only place); nothing is written then.
        """
        from dcm.atomic import check_writable
        from dcm.data.nifti import Geometry, write_nifti

        self._need_image()
        check_writable(path)
        geometry = self.geometry or Geometry(spacing_xyz=tuple(self.spacing_zyx[::-1]))
        return write_nifti(path, self.segs, geometry)

    # -------------------------------------------------------------------------------------- set mask
    # (added for dcm.serve: a viewer's initial segmentation / lasso fill / erase becomes the previous mask)
    def set_mask(self, obj: int, mask: np.ndarray) -> np.ndarray:
        """Make ``mask`` (a (z, y, x) array on the image grid; non-zero = inside) the object's mask, without a
        model call; returns the object's mask.

        It is what the next interaction of the object refines (the previous mask the experts read); the
        object's prompts stay. One undo level, written like a prediction: the overlap rule and the clicks rule
        apply (a positive click of the object stays inside it, another object's click stays outside).

        Raises:
            CaseError: (a ValueError) ``mask: ...`` when its shape is not the image's.
        """
        prompts = self._need_object(obj)
        mask = np.asarray(mask)
        if mask.shape != self.image.shape:
            raise CaseError(None, "mask", f"shape {mask.shape} does not match the image {self.image.shape}")
        inside = mask != 0
        touched = inside | (self.segs == obj)
        fused = None
        if touched.any():
            region = mask_bbox(touched)
            fused = FusedPrediction(region, inside[region].astype(np.float32), complete=True)  # type: ignore[arg-type]
        promises = {}
        if self.engine_cfg["honour_clicks"]:
            promises = promises_of([p for _, p in sorted(self.objects.items())], self.image.shape)
        write = _Write(obj, prompts, fused, promises)
        return self._commit(write)

    # -------------------------------------------------------------------------------------- core
    def _interact(self, obj: int, prompts: ObjectPrompts) -> np.ndarray:
        case = Case(name="session", image=self.image, spacing_xyz=tuple(self.spacing_zyx[::-1]),  # type: ignore
                    objects=[prompts], prev_pred=self.segs)
        promises = {}
        if self.engine_cfg["honour_clicks"]:
            objects = [prompts if label == obj else p for label, p in sorted(self.objects.items())]
            promises = promises_of(objects, self.image.shape)
        fused = predict_object(case, prompts, self.experts, self.engine_cfg, promise=promises.get(obj))
        write = _Write(obj, self.objects[obj], fused, promises)
        self.objects[obj] = prompts
        return self._commit(write)

    def _commit(self, write: _Write) -> np.ndarray:
        """Log ``write`` (undoable), apply it to the labels and return its object's new mask."""
        self._log.append(write)
        self._undoable[write.label] = min(self._undoable[write.label] + 1, self.max_undo)
        self._apply(write, self.segs)
        self._fold()
        self.last_changed_region = write.region
        return self.mask(write.label)

    def _apply(self, write: _Write, segs: np.ndarray) -> None:
        if write.fused is not None:
            protection = ClickProtection(write.promises) if write.promises else None
            LabelWriter(segs, self.engine_cfg["overlap"], protection).write(
                write.label, write.fused, float(self.engine_cfg["threshold"]))

    def _clear_log(self) -> None:
        """Forget every write (called once the objects are cleared)."""
        self._log.clear()
        self._base = np.zeros(self.image.shape, dtype=np.uint8) if self.image is not None else None
        self._undoable = {}

    def _fold(self) -> None:
        """Move the writes at the head of the log that can no longer be undone into the base map."""
        while self._log:
            label = self._log[0].label
            if sum(w.label == label for w in self._log) <= self._undoable.get(label, 0):
                break
            self._apply(self._log.pop(0), self._base)

    def _replay(self) -> None:
        segs = self._base.copy()
        for write in self._log:
            self._apply(write, segs)
        self.segs[...] = segs
