"""Leases and the per-client state behind them.

One lease = one :class:`ServedSession`: its own :class:`dcm.engine.session.InteractiveSession` (experts cloned
from the ones loaded at start-up: the networks are shared, caches are not), image, target buffer and object.
The viewer's target buffer is one object: ``reset_interactions`` starts the next one.

Concurrency: every call on a session holds its lock; the calls that run a network also hold the device lock
(one per server: predictions are serialised), always taken after the session lock. A call either completes or
leaves the session as it was (a failed multi-step prompt is undone), so a client that drops mid-request leaves
no broken session.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from dcm.regions import mask_bbox
from dcm.serve import prompts as P

__all__ = ["Change", "ServedSession", "SessionRegistry", "AtCapacity", "UnknownLease", "StateError",
           "clone_experts"]

logger = logging.getLogger("dcm.serve")


class AtCapacity(Exception):
    """Every session slot is taken (503)."""


class UnknownLease(Exception):
    """No session has this lease token (410: the client raises SessionExpiredError)."""


class StateError(Exception):
    """The call does not fit the session's state, e.g. no image yet (409)."""


@dataclass
class Change:
    """What an interaction or an undo did to the client's target buffer.

    Attributes:
        ran: something was predicted or undone (the protocol's ``ran_prediction``).
        bbox: half-open ``[[lo, hi]] * 3`` of the voxels that changed, or None when none did.
        values: the buffer's new content on ``bbox`` (the target buffer's dtype), or None.
    """

    ran: bool
    bbox: Optional[List[List[int]]] = None
    values: Optional[np.ndarray] = None


def _collect_modules(obj: Any, found: Dict[int, Any], seen: set, depth: int = 0) -> None:
    import torch

    if id(obj) in seen or depth > 12:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        found[id(obj)] = obj
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        _collect_modules(item, found, seen, depth + 1)


def clone_experts(experts: Dict[str, Any]) -> Dict[str, Any]:
    """Copies of the experts that share their networks (weights on the device once) but own their caches."""
    shared: Dict[int, Any] = {}
    _collect_modules(experts, shared, set())
    return copy.deepcopy(experts, dict(shared))


def _changed_bbox(before: np.ndarray, after: np.ndarray) -> Optional[List[List[int]]]:
    """Half-open bounding box of the voxels where ``before`` and ``after`` differ, or None."""
    region = mask_bbox(before != after)
    return None if region is None else [[s.start, s.stop] for s in region]


class ServedSession:
    """One client's state; every public method is called with :attr:`lock` held (see the registry)."""

    def __init__(self, session: Any, device_lock: threading.Lock, undo_levels: int):
        self.dcm = session
        self.device_lock = device_lock
        self.undo_levels = undo_levels
        self.lock = threading.Lock()
        now = time.monotonic()
        self.last_active = now  # real user actions (idle timeout)
        self.last_seen = now  # any request, heartbeats included (liveness timeout)
        self.image_shape: Optional[Tuple[int, int, int]] = None
        self.spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
        self.target_shape: Optional[Tuple[int, int, int]] = None
        self.target_dtype: Optional[np.dtype] = None
        self.shown: Optional[np.ndarray] = None  # the object mask as the client's buffer holds it (bool)
        self.obj: Optional[int] = None
        self.steps: List[int] = []  # per protocol interaction: how many session undo levels it used
        self.queued: List[List[Callable[[], int]]] = []  # prompts sent with run_prediction=False, in order
        self.do_autozoom = True

    # ------------------------------------------------------------------ clocks
    def mark_seen(self) -> None:
        self.last_seen = time.monotonic()

    def mark_active(self) -> None:
        self.last_active = self.last_seen = time.monotonic()

    # ------------------------------------------------------------------ image and buffer
    def set_image(self, image: np.ndarray, spacing: Optional[Tuple[float, float, float]]) -> List[str]:
        """Set the (c, a0, a1, a2) image (channel 0 is used); returns warnings for the client."""
        warnings: List[str] = []
        if image.ndim != 4:
            raise P.PromptError(f"image must be 4D (c, a0, a1, a2), got shape {list(image.shape)}")
        if image.shape[0] < 1:
            raise P.PromptError(f"image has no channel, shape {list(image.shape)}")
        if image.shape[0] > 1:
            warnings.append(f"image has {image.shape[0]} channels; DCM segments channel 0 only")
        if spacing is None:
            warnings.append("no image_properties['spacing']: 1 mm voxels assumed")
        volume = np.ascontiguousarray(image[0])
        self.dcm.set_image(volume, spacing=spacing or (1.0, 1.0, 1.0))  # CaseError (400) leaves it as it was
        self.image_shape = tuple(int(s) for s in volume.shape)  # type: ignore[assignment]
        self.spacing = tuple(float(s) for s in self.dcm.spacing_zyx)  # type: ignore[assignment]
        self.obj = None
        self.steps.clear()
        self.queued.clear()
        if self.shown is not None:
            self.shown[...] = False
        return warnings

    def set_target_buffer(self, shape: Tuple[int, int, int], dtype: np.dtype) -> None:
        """The client's (a0, a1, a2) buffer, zero on the server's side as in nnInteractive."""
        if self.image_shape is not None and tuple(shape) != self.image_shape:
            raise P.PromptError(f"target buffer shape {list(shape)} is not the image's {list(self.image_shape)}")
        self.target_shape, self.target_dtype = tuple(shape), np.dtype(dtype)  # type: ignore[assignment]
        self.shown = np.zeros(shape, dtype=bool)

    def reset_interactions(self) -> None:
        """Drop the object (the next interaction starts a new one); the client zeroes its buffer."""
        if self.obj is not None:
            self.dcm.remove(self.obj)
        self.obj = None
        self.steps.clear()
        self.queued.clear()
        if self.shown is not None:
            self.shown[...] = False

    # ------------------------------------------------------------------ interactions
    def _ready(self) -> None:
        if self.image_shape is None:
            raise StateError("no image yet: call set_image first")
        if self.shown is None:
            raise StateError("no target buffer yet: call set_target_buffer first")
        if self.target_shape != self.image_shape:
            raise StateError(f"target buffer shape {list(self.target_shape)} is not the image's "
                             f"{list(self.image_shape)}: call set_target_buffer again")

    def _object(self) -> int:
        if self.obj is None:
            self.obj = self.dcm.new_object()
        return self.obj

    def _run(self, steps: List[Callable[[], int]]) -> Change:
        """Apply queued prompts then ``steps`` (each returns the session undo levels it used) as one undoable
        interaction under the device lock; on any error undo what was applied and re-raise."""
        work = [step for prompt in self.queued for step in prompt] + steps
        used = 0
        created = self.obj is None
        with self.device_lock:
            try:
                self._object()
                for step in work:
                    used += step()
            except BaseException:
                for _ in range(used):
                    self.dcm.undo(self.obj)
                if created and self.obj is not None:
                    self.dcm.remove(self.obj)
                    self.obj = None
                raise
        self.queued.clear()
        if used:
            self.steps.append(used)
            levels = int(getattr(self.dcm, "max_undo", self.undo_levels))  # the session's own undo depth
            while len(self.steps) > self.undo_levels or sum(self.steps) > levels:  # the oldest are final
                self.steps.pop(0)
        return self._answer(ran=True)

    def _add(self, steps: List[Callable[[], int]], run_prediction: bool) -> Change:
        """Run ``steps`` (one prompt) now, or queue them until a prompt that predicts."""
        self._ready()
        if run_prediction:
            return self._run(steps)
        self.queued.append(steps)
        return Change(ran=False)

    def _answer(self, ran: bool) -> Change:
        """The change of the object mask since the client last saw it."""
        mask = self.dcm.mask(self.obj) if self.obj is not None else np.zeros(self.image_shape, dtype=bool)
        bbox = _changed_bbox(self.shown, mask)
        if bbox is None:
            return Change(ran=ran)
        region = tuple(slice(lo, hi) for lo, hi in bbox)
        self.shown[region] = mask[region]
        return Change(ran=ran, bbox=bbox, values=mask[region].astype(self.target_dtype))

    def add_box(self, coords: Any, include: bool, run_prediction: bool = True) -> Change:
        self._ready()
        if not include:
            raise P.PromptError("DCM has no exclude box: use exclude points, a scribble or an exclude lasso")
        box = P.box_from_half_open(coords, self.image_shape, self.spacing)
        return self._add([lambda: self._box(box)], run_prediction)

    def _box(self, box: Dict[str, int]) -> int:
        self.dcm.add_box(self.obj, box)
        return 1

    def add_point(self, coordinates: Any, include: bool, run_prediction: bool = True) -> Change:
        self._ready()
        voxel = P.point_voxel(coordinates, self.image_shape)
        return self._add([lambda: self._click(voxel, include)], run_prediction)

    def _click(self, voxel: Tuple[int, int, int], positive: bool) -> int:
        self.dcm.add_point(self.obj, voxel, positive=bool(positive))
        return 1

    def _crop_to_volume(self, crop: np.ndarray, interaction_bbox: Any, what: str) -> np.ndarray:
        """The client's mask interaction (a crop at ``interaction_bbox``, or the whole volume) as a volume."""
        if crop.ndim != 3:
            raise P.PromptError(f"{what} must be a 3D array, got shape {list(crop.shape)}")
        if interaction_bbox is None:
            interaction_bbox = [[0, n] for n in self.image_shape]
        if (not isinstance(interaction_bbox, list) or len(interaction_bbox) != 3
                or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                       for v in p) for p in interaction_bbox)):
            raise P.PromptError(f"interaction_bbox must be 3 [lo, hi] integer pairs, got {interaction_bbox!r}"[:200])
        for (lo, hi), n in zip(interaction_bbox, self.image_shape):
            if not 0 <= lo < hi <= n:
                raise P.PromptError(f"interaction_bbox {interaction_bbox} is outside the image "
                                    f"{list(self.image_shape)}")
        if [hi - lo for lo, hi in interaction_bbox] != list(crop.shape):
            raise P.PromptError(f"{what} shape {list(crop.shape)} does not match interaction_bbox {interaction_bbox}")
        volume = np.zeros(self.image_shape, dtype=bool)
        volume[tuple(slice(lo, hi) for lo, hi in interaction_bbox)] = crop != 0
        return volume

    def add_scribble(self, crop: np.ndarray, include: bool, interaction_bbox: Any = None,
                     run_prediction: bool = True) -> Change:
        self._ready()
        stroke = self._crop_to_volume(crop, interaction_bbox, "scribble")
        clicks = P.scribble_clicks(stroke, self.spacing)
        return self._add([lambda v=v: self._click(v, include) for v in clicks], run_prediction)

    def add_lasso(self, crop: np.ndarray, include: bool, interaction_bbox: Any = None,
                  run_prediction: bool = True) -> Change:
        self._ready()
        region = P.fill_lasso(self._crop_to_volume(crop, interaction_bbox, "lasso"))
        if not include:
            return self._add([lambda: self._erase(region)], run_prediction)
        box = P.box_from_mask(region, self.spacing)
        return self._add([lambda: self._set_mask(region), lambda: self._box(box)], run_prediction)

    def _set_mask(self, mask: np.ndarray) -> int:
        self.dcm.set_mask(self.obj, mask)
        return 1

    def _erase(self, region: np.ndarray) -> int:
        self.dcm.set_mask(self.obj, self.dcm.mask(self.obj) & ~region)
        return 1

    def add_initial_seg(self, seg: np.ndarray, run_prediction: bool = False) -> Change:
        """The object restarts from ``seg`` (its prompts are dropped, as nnInteractive resets interactions);
        with ``run_prediction`` it is refined with its bounding box. The client already holds ``seg``."""
        self._ready()
        if seg.shape != self.image_shape:
            raise P.PromptError(f"initial seg shape {list(seg.shape)} is not the image's {list(self.image_shape)}")
        inside = seg != 0
        box = None
        if run_prediction and inside.any():
            try:
                box = P.box_from_mask(inside, self.spacing)
            except P.PromptError:  # a line or a point: kept as the mask, nothing to refine it with
                box = None
        self.reset_interactions()
        self.shown[...] = inside  # the client writes seg into its buffer itself

        steps = [lambda: self._set_mask(inside)] + ([lambda: self._box(box)] if box is not None else [])
        change = self._run(steps)
        return change if run_prediction else Change(ran=False)

    def predict(self) -> Change:
        """Run the prompts queued with ``run_prediction=False``."""
        self._ready()
        if not self.queued:
            return Change(ran=False)
        return self._run([])

    def undo(self) -> Change:
        """Undo the last interaction (several levels); ran=False when there is nothing to undo."""
        self._ready()
        if self.queued:  # a prompt not yet predicted: dropping it changes nothing on the buffer
            self.queued.pop()
            return Change(ran=True)
        if not self.steps or self.obj is None:
            return Change(ran=False)
        for _ in range(self.steps.pop()):
            try:
                self.dcm.undo(self.obj)
            except IndexError:  # already folded by the session: nothing older to undo
                self.steps.clear()
                break
        return self._answer(ran=True)


class SessionRegistry:
    """Lease token -> :class:`ServedSession`, at most ``max_sessions``, reaped when idle or silent."""

    def __init__(self, make_session: Callable[[], Any], max_sessions: int, idle_timeout: float,
                 liveness_timeout: float, undo_levels: int = 20):
        self.make_session = make_session
        self.max_sessions = int(max_sessions)
        self.idle_timeout = float(idle_timeout)
        self.liveness_timeout = float(liveness_timeout)
        self.undo_levels = int(undo_levels)
        self.device_lock = threading.Lock()
        self._sessions: Dict[str, ServedSession] = {}
        self._mu = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def claim(self) -> str:
        with self._mu:
            if len(self._sessions) >= self.max_sessions:
                raise AtCapacity(f"server is at capacity ({self.max_sessions} sessions)")
            token = secrets.token_hex(16)
            self._sessions[token] = ServedSession(self.make_session(), self.device_lock, self.undo_levels)
            logger.info("claimed session %s… (%d/%d)", token[:8], len(self._sessions), self.max_sessions)
            return token

    def get(self, token: Optional[str], seen: bool = True) -> ServedSession:
        """The session of ``token`` (marked seen unless ``seen`` is False); UnknownLease otherwise."""
        if not token:
            raise UnknownLease("lease token missing (header X-Lease-Token): claim a session first")
        with self._mu:
            served = self._sessions.get(token)
        if served is None:
            raise UnknownLease("lease expired or unknown")
        if seen:
            served.mark_seen()
        return served

    def release(self, token: Optional[str]) -> bool:
        with self._mu:
            served = self._sessions.pop(token or "", None)
        if served is not None:
            logger.info("released session %s… (%d/%d)", (token or "")[:8], len(self._sessions), self.max_sessions)
        return served is not None

    def remaining(self, served: ServedSession) -> float:
        """Seconds until the idle timeout reaps ``served``."""
        return max(0.0, self.idle_timeout - (time.monotonic() - served.last_active))

    def sweep(self) -> int:
        """Drop the sessions idle past the idle timeout or silent past the liveness timeout; how many."""
        now = time.monotonic()
        with self._mu:
            dead = [t for t, s in self._sessions.items()
                    if now - s.last_seen > self.liveness_timeout or now - s.last_active > self.idle_timeout]
            for token in dead:
                del self._sessions[token]
        for token in dead:
            logger.info("reaped session %s…", token[:8])
        return len(dead)

    def close_all(self) -> None:
        with self._mu:
            self._sessions.clear()
