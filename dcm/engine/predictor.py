"""The DCM engine: route each object's prompts to the experts, fuse, write, within the time budget.

``DCMPredictor(cfg, experts)`` is a callable ``case -> segs`` (what ``predict.sh`` and the evaluator's
in-process mode call); :class:`dcm.engine.session.InteractiveSession` drives the same per-object step.

Engine config (section ``engine``): keys, defaults and checks in :class:`dcm.config_schema.EngineConfig`
(policy, fusion, local_margin, without_box, overlap, local_at_box_step, threshold, honour_clicks,
update_scope, fallback, click_correction, budget). ``DCMPredictor`` checks it at construction; the interactive
session builds one ``DCMPredictor`` and uses its checked config, so both refuse the same bad config in the same
words.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import numpy as np

from dcm.data.cases import Case
from dcm.config_schema import EngineConfig
from dcm.engine.clicks import ClickPromise, ClickProtection, honour_clicks, promises_of
from dcm.engine.fusion import FusedPrediction, LabelWriter, fuse_predictions, label_counts, take_local_near_clicks
from dcm.engine.policies import GLOBAL, LOCAL, route
from dcm.errors import DCMError
from dcm.experts.base import Expert, RoIPrediction
from dcm.prompts import ObjectPrompts, box_center_click

__all__ = ["ENGINE_DEFAULTS", "CallBudget", "DCMPredictor", "check_engine_config", "predict_object"]

#: The ``engine`` defaults as a dict: :class:`dcm.config_schema.EngineConfig`, where they are written.
ENGINE_DEFAULTS: Dict[str, Any] = EngineConfig().to_dict()


def check_engine_config(engine_cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The ``engine`` section with its defaults filled in, every key checked (:class:`EngineConfig`).

    Raises:
        ConfigError: one line naming the first wrong key (``engine.policy must be one of ...``), before any
            object is predicted.
    """
    return EngineConfig.from_mapping(engine_cfg, "engine").to_dict()


def _say(line: str) -> None:
    """One stderr line, whatever newlines the message carries."""
    print(" ".join(line.split()), file=sys.stderr, flush=True)


@dataclass
class CallBudget:
    """This call's share of the case budget and the time spent in it.

    The organisers allow ``seconds_per_object x objects`` over the ``calls_per_case`` calls of a case,
    counting start-up and model loading, so ``start`` should be the process start when known.
    """

    seconds: float
    start: float = field(default_factory=time.perf_counter)
    costs: Dict[str, List[float]] = field(default_factory=dict)
    priors: Dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_case(cls, num_objects: int, cfg: Dict[str, Any], start: Optional[float] = None) -> "CallBudget":
        b = {**ENGINE_DEFAULTS["budget"], **(cfg or {})}
        share = float(b["seconds_per_object"]) * max(num_objects, 1) / int(b["calls_per_case"]) * float(b["safety"])
        return cls(seconds=share, start=start if start is not None else time.perf_counter(),
                   priors=dict(b.get("expected_seconds") or {}))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def expected(self, expert: str) -> float:
        measured = self.costs.get(expert)
        return float(np.mean(measured)) if measured else float(self.priors.get(expert, 0.0))

    def allows(self, expert: str) -> bool:
        return self.elapsed + self.expected(expert) <= self.seconds

    def record(self, expert: str, seconds: float) -> None:
        self.costs.setdefault(expert, []).append(seconds)


def _local_view(obj: ObjectPrompts) -> ObjectPrompts:
    """At the box step the local expert has no click to centre on: it takes the box centre as one
    (:func:`dcm.prompts.box_center_click`)."""
    if obj.clicks or obj.box is None:
        return obj
    return replace(obj, clicks=[box_center_click(obj.box)])


def predict_object(
    case: Case,
    obj: ObjectPrompts,
    experts: Dict[str, Expert],
    cfg: Dict[str, Any],
    budget: Optional[CallBudget] = None,
    promise: Optional[ClickPromise] = None,
    prev_counts: Optional[np.ndarray] = None,
) -> Optional[FusedPrediction]:
    """Route one object's prompts to the experts and fuse their answers (None: keep the previous mask).

    Args:
        case: the case; ``case.prev_pred`` is the previous mask the experts read.
        obj: the object.
        experts: ``{'global': ..., 'local': ...}`` (either may be absent).
        cfg: the checked ``engine`` config section (:func:`check_engine_config`: every key present).
        budget: when given, an expert call that would overrun it is skipped with a message.
        promise: the object's click promise among all objects of the image (``promises_of``); by default its
            own clicks alone. Used when ``cfg['honour_clicks']``.
        prev_counts: :func:`~dcm.engine.fusion.label_counts` of ``case.prev_pred``, counted once per click step
            by the caller (counted per object otherwise).
    """
    if obj.problem or not obj.has_prompt:
        return None
    names = route(cfg["policy"], case, obj, experts)
    if obj.box is None and cfg["without_box"] != "policy" and len(names) > 1:
        names = [n for n in names if n == cfg["without_box"]]
    if not obj.clicks and cfg["local_at_box_step"] == "skip" and len(names) > 1:
        names = [n for n in names if n != LOCAL]
    predictions: List[RoIPrediction] = []
    local_prediction: Optional[RoIPrediction] = None
    local_view = _local_view(obj)
    for name in names:
        if budget is not None and not budget.allows(name):
            _say(f"{case.path or case.name}: object {obj.label}: {name} expert skipped to stay within the time budget "
                 f"({budget.elapsed:.1f} s of {budget.seconds:.1f} s used, ~{budget.expected(name):.1f} s needed)")
            continue
        t0 = time.perf_counter()
        prediction = experts[name].predict(local_view if name == LOCAL else obj, case.prev_pred)
        if budget is not None:
            budget.record(name, time.perf_counter() - t0)
        if prediction is not None:
            predictions.append(prediction)
            if name == LOCAL:
                local_prediction = prediction
    last = local_view.last_click  # the click the local expert centred on (the box centre at the box step)
    threshold = float(cfg["threshold"])
    fused = fuse_predictions(predictions, cfg["fusion"],
                             click_zyx=last.zyx if last is not None else None,
                             click_positive=last.positive if last is not None else True,
                             threshold=threshold, margin=cfg["local_margin"], copy=False)
    if cfg["local_click_radius"] > 0 and fused is not None and local_prediction is not None and len(predictions) > 1:
        fused = take_local_near_clicks(fused, local_prediction, [c.zyx for c in local_view.clicks],
                                       cfg["local_click_radius"])
    if not cfg["honour_clicks"] or not obj.clicks:
        return fused
    if promise is None:
        promise = promises_of([obj], case.shape)[obj.label]
    return honour_clicks(fused, obj, promise, case.image, case.spacing_zyx, case.prev_pred, threshold,
                         cfg["click_correction"], cfg["update_scope"], cfg["max_removal"],
                         cfg["max_addition"], cfg["addition_floor"], prev_counts,
                         cfg["removal_beyond_cap"], cfg["addition_beyond_cap"])


class DCMPredictor:
    """``case -> segs`` with the configured policy, fusion and overlap rules.

    Args:
        experts: built experts by role (``'global'``, ``'local'``).
        engine_cfg: the ``engine`` config section (missing keys take :data:`ENGINE_DEFAULTS`); checked here.
        process_start: ``time.perf_counter()`` at process start, so the first case's budget counts model
            loading; each later case of the same process (a folder of several cases) starts its own clock.
    """

    def __init__(self, experts: Dict[str, Expert], engine_cfg: Optional[Dict[str, Any]] = None,
                 process_start: Optional[float] = None):
        #: the checked ``engine`` section, every key present (shared with the session that built this)
        self.cfg: Dict[str, Any] = check_engine_config(engine_cfg)
        self.experts = experts
        self.process_start = process_start
        self._first_call = True

    def __call__(self, case: Case) -> np.ndarray:
        """Predict every object of ``case``; returns the (z, y, x) uint8 label map.

        An object whose prompts are unusable (``ObjectPrompts.problem``) or whose prediction raised keeps its
        previous mask exactly: the other objects are written around it. With ``fallback: local_case`` a case
        without boxes, or one on which the global expert raised, is predicted by the local expert alone from
        an empty label map instead (the released ``predict.sh``). Memory: one label map for the whole case, the
        rest per object on its RoI only.

        Raises:
            DCMError: every object that had prompts failed (a broken model, not one bad object).
        """
        if not case.objects:
            return case.prev_pred.copy() if case.prev_pred is not None else np.zeros(case.shape, dtype=np.uint8)
        start, self._first_call = (self.process_start if self._first_call else None), False
        budget = CallBudget.for_case(case.num_objects, self.cfg["budget"], start)
        for expert in self.experts.values():
            expert.set_image(case.image, case.spacing_zyx)
        fallback = self.cfg["fallback"] == "local_case" and LOCAL in self.experts
        if fallback and not case.has_boxes:  # the released global expert has no RoI without a box
            return self._predict_objects(case, budget, local_case=True)
        try:
            return self._predict_objects(case, budget, local_case=False, global_fails_case=fallback)
        except _GlobalExpertFailed as e:
            _say(f"{case.path or case.name}: object {e.label}: global expert failed ({e.reason}); the local expert "
                 f"predicts the whole case (engine.fallback: local_case)")
            return self._predict_objects(case, budget, local_case=True)

    def _predict_objects(self, case: Case, budget: CallBudget, local_case: bool,
                         global_fails_case: bool = False) -> np.ndarray:
        """Every object of ``case`` in order, written over its previous output; with ``local_case`` by the local
        expert alone over an empty label map. ``global_fails_case``: a global expert's failure raises
        :class:`_GlobalExpertFailed` instead of keeping that object's previous mask."""
        cfg = dict(self.cfg, policy="local_only") if local_case else self.cfg
        experts = self.experts
        if global_fails_case and GLOBAL in experts:
            experts = {**experts, GLOBAL: _CaseFailingExpert(experts[GLOBAL])}
        if case.prev_pred is not None and not local_case:
            segs = case.prev_pred.copy()
        else:
            segs = np.zeros(case.shape, dtype=np.uint8)
        promises = (promises_of([o for o in case.objects if not o.problem], case.shape)
                    if cfg["honour_clicks"] else {})
        # one pass over the previous label map per click step, when a cap reads the objects' sizes
        capped = (cfg["max_removal"] > 0 or cfg["max_addition"] > 0 or cfg["max_taken"] > 0
                  or cfg["click_correction"]["max_mask_fraction"] > 0)
        prev_counts = (label_counts(case.prev_pred) if cfg["honour_clicks"] and capped and case.prev_pred is not None
                       else None)
        writer = LabelWriter(segs, cfg["overlap"], ClickProtection(promises) if promises else None,
                             max_taken=cfg["max_taken"] if cfg["honour_clicks"] else 0.0,
                             prev_pred=None if local_case else case.prev_pred, spacing_zyx=case.spacing_zyx,
                             prev_counts=prev_counts)
        kept = [obj.label for obj in case.objects if obj.problem]
        attempted, failures = 0, []
        for obj in case.objects:
            if obj.problem or not obj.has_prompt:
                continue
            attempted += 1
            try:
                fused = predict_object(case, obj, experts, cfg, budget, promises.get(obj.label), prev_counts)
            except _GlobalExpertFailed:
                raise
            except Exception as e:  # one object's failure must not cost the others their masks
                failures.append((obj.label, f"{type(e).__name__}: {e}"))
                kept.append(obj.label)
                continue
            if fused is not None:
                writer.write(obj.label, fused, float(cfg["threshold"]),
                             obj.last_click.zyx if obj.last_click is not None else None)
        where = case.path or case.name
        if attempted and len(failures) == attempted:
            raise DCMError(" ".join(f"{where}: prediction failed for every object ({failures[0][1]})".split()))
        for label, reason in failures:
            _say(f"{where}: object {label}: prediction failed ({reason}); its previous mask is kept")
        if kept and case.prev_pred is not None:
            _restore(segs, case.prev_pred, kept)
        return segs


class _GlobalExpertFailed(Exception):
    """The global expert raised on object ``label`` while ``engine.fallback: local_case`` redoes such a case."""

    def __init__(self, label: int, reason: str):
        super().__init__(reason)
        self.label, self.reason = label, reason


class _CaseFailingExpert:
    """The global expert under ``engine.fallback: local_case``: an error of its ``predict`` fails the case
    (:class:`_GlobalExpertFailed`) instead of one object; everything else is the expert's own."""

    def __init__(self, expert: Expert):
        self._expert = expert

    def __getattr__(self, name: str) -> Any:
        return getattr(self._expert, name)

    def predict(self, obj: ObjectPrompts, prev_pred: Optional[np.ndarray] = None) -> Optional[RoIPrediction]:
        try:
            return self._expert.predict(obj, prev_pred)
        except Exception as e:
            raise _GlobalExpertFailed(obj.label, f"{type(e).__name__}: {e}") from e


def _restore(segs: np.ndarray, prev_pred: np.ndarray, labels: List[int]) -> None:
    """Put back the previous masks of ``labels`` exactly, each on its own bounding box of ``prev_pred``."""
    from scipy import ndimage  # only on this rare path: SciPy's import costs predict.sh ~0.4 s per call

    boxes = ndimage.find_objects(prev_pred, max_label=max(labels))
    for label in labels:
        box = boxes[label - 1]
        if box is None:
            continue
        segs[box][prev_pred[box] == label] = label


def variant_predictor(cfg: Dict[str, Any], weights: Optional[str], built: Dict[str, Any],
                      device: Optional[str] = None, random_init: bool = False, seed: int = 0) -> Any:
    """A ``DCMPredictor`` for one variant's config, over the experts its policy calls.

    Experts are built once per distinct expert config and weights and kept in ``built`` for the next
    variants; a role an earlier variant did not need (``global_only`` before ``dual``) is built then. Each
    role is built on its own after ``torch.manual_seed(seed)``, so a random-init expert is the same whichever
    variant builds it first (a worker of a parallel run sees the variants in another order).
    """
    import torch

    from dcm.experts import build_experts, needed_roles

    key = json.dumps({k: cfg.get(k) for k in ("global_expert", "local_expert", "weights", "device")},
                     sort_keys=True, default=str) + str(weights)
    experts = built.setdefault(key, {})
    roles = needed_roles(cfg)
    for role in roles:
        if role not in experts:
            one_role = dict(cfg, engine=dict(cfg.get("engine") or {}, policy=f"{role}_only"))
            torch.manual_seed(seed)
            experts[role] = build_experts(one_role, weights, device, random_init=random_init)[role]
    return DCMPredictor({r: experts[r] for r in roles}, cfg["engine"])
