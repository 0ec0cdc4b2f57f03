"""The DCM engine: route each object's prompts to the experts, fuse, write, within the time budget.

``DCMPredictor(cfg, experts)`` is a callable ``case -> segs`` (what ``predict.sh`` and the evaluator's
in-process mode call); :class:`dcm.engine.session.InteractiveSession` drives the same per-object step.

Engine config (section ``engine``)::

    policy: dual                     # see dcm.engine.policies
    fusion: local_overrides          # local_overrides | average | confidence | click_region
    local_margin: 0.0                # click_region: the local change counts where |prob - threshold| > margin;
                                     # or [add, remove]: margins of foreground / background clicks
    without_box: policy              # objects without a box (no-box cases): policy (its experts) | local | global
    overlap: later_wins              # later_wins | highest_prob | keep_others
    local_at_box_step: box_center    # box_center | skip
    threshold: 0.5
    honour_clicks: true              # keep every click (dcm.engine.clicks); false: the experts' answer as it is
    click_correction:                # for a click no expert kept (dcm.engine.clicks)
      methods: [random_walker]
      radius_mm: 10.0
      radius_object_factor: 1.0
      probability_levels: [0.3, 0.15, 0.05]
      random_walker_beta: 130.0
      random_walker_depth_factor: 2.0
    budget:
      seconds_per_object: 90         # the challenge budget, summed over the calls of a case
      calls_per_case: 6
      safety: 0.85                   # fraction of the call's share we allow ourselves
      expected_seconds: {global: 1.0, local: 5.0}   # cost priors until a call is measured
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

import numpy as np

from dcm.data.cases import Case
from dcm.engine.clicks import CORRECTION_DEFAULTS, ClickPromise, ClickProtection, check_click_correction, \
    honour_clicks, promises_of
from dcm.engine.fusion import FUSION_RULES, OVERLAP_RULES, FusedPrediction, LabelWriter, click_margins, fuse_predictions
from dcm.engine.policies import GLOBAL, LOCAL, POLICIES, route
from dcm.errors import ConfigError, DCMError
from dcm.experts.base import Expert, RoIPrediction
from dcm.prompts import ObjectPrompts, box_center_click

__all__ = ["ENGINE_DEFAULTS", "CallBudget", "DCMPredictor", "check_engine_config", "predict_object"]

ENGINE_DEFAULTS: Dict[str, Any] = {
    "policy": "dual",
    "fusion": "local_overrides",
    "local_margin": 0.0,
    "without_box": "policy",
    "overlap": "later_wins",
    "local_at_box_step": "box_center",
    "threshold": 0.5,
    "honour_clicks": True,
    "click_correction": CORRECTION_DEFAULTS,
    "budget": {
        "seconds_per_object": 90.0,
        "calls_per_case": 6,
        "safety": 0.85,
        "expected_seconds": {GLOBAL: 1.0, LOCAL: 5.0},
    },
}


def _number(value: Any, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the range; ConfigError naming ``engine.<key>`` otherwise (bools refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"engine.{key} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return float(value)


def check_engine_config(engine_cfg: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The ``engine`` section with :data:`ENGINE_DEFAULTS` filled in, every key checked.

    Raises:
        ConfigError: one line naming the first wrong key (``engine.policy must be one of ...``), before any
            object is predicted.
    """
    given = dict(engine_cfg or {})
    unknown = sorted(set(given) - set(ENGINE_DEFAULTS))
    if unknown:
        raise ConfigError(f"engine: unknown key(s) {unknown}; known: {sorted(ENGINE_DEFAULTS)}")
    cfg = {**ENGINE_DEFAULTS, **given}
    budget = given.get("budget") or {}
    if not isinstance(budget, dict):
        raise ConfigError(f"engine.budget must be a mapping, got {budget!r}")
    unknown = sorted(set(budget) - set(ENGINE_DEFAULTS["budget"]))
    if unknown:
        raise ConfigError(f"engine.budget: unknown key(s) {unknown}; known: {sorted(ENGINE_DEFAULTS['budget'])}")
    cfg["budget"] = b = {**ENGINE_DEFAULTS["budget"], **budget}
    choices = {"policy": tuple(POLICIES), "fusion": FUSION_RULES, "overlap": OVERLAP_RULES,
               "without_box": ("policy", GLOBAL, LOCAL), "local_at_box_step": ("box_center", "skip")}
    for key, allowed in choices.items():
        if not isinstance(cfg[key], str) or cfg[key] not in allowed:
            raise ConfigError(f"engine.{key} must be one of {list(allowed)}, got {cfg[key]!r}")
    try:
        click_margins(cfg["local_margin"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"engine.{e}") from None
    cfg["threshold"] = _number(cfg["threshold"], "threshold", 0.0, 1.0, low_open=True, high_open=True)
    if not isinstance(cfg["honour_clicks"], bool):
        raise ConfigError(f"engine.honour_clicks must be true or false, got {cfg['honour_clicks']!r}")
    try:
        cfg["click_correction"] = check_click_correction(cfg["click_correction"])
    except ValueError as e:
        raise ConfigError(f"engine.{e}") from None
    _number(b["seconds_per_object"], "budget.seconds_per_object", 0.0, 1e6, low_open=True)
    _number(b["safety"], "budget.safety", 0.0, 1.0, low_open=True)
    calls = b["calls_per_case"]
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ConfigError(f"engine.budget.calls_per_case must be an integer >= 1, got {calls!r}")
    expected = b["expected_seconds"]
    if not isinstance(expected, dict):
        raise ConfigError(f"engine.budget.expected_seconds must be a mapping, got {expected!r}")
    for name, value in expected.items():
        _number(value, f"budget.expected_seconds.{name}", 0.0, 1e6)
    return cfg


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
) -> Optional[FusedPrediction]:
    """Route one object's prompts to the experts and fuse their answers (None: keep the previous mask).

    Args:
        case: the case; ``case.prev_pred`` is the previous mask the experts read.
        obj: the object.
        experts: ``{'global': ..., 'local': ...}`` (either may be absent).
        cfg: the ``engine`` config section.
        budget: when given, an expert call that would overrun it is skipped with a message.
        promise: the object's click promise among all objects of the image (``promises_of``); by default its
            own clicks alone. Used when ``cfg['honour_clicks']``.
    """
    if obj.problem or not obj.has_prompt:
        return None
    names = route(cfg["policy"], case, obj, experts)
    if obj.box is None and cfg.get("without_box", "policy") != "policy" and len(names) > 1:
        names = [n for n in names if n == cfg["without_box"]]
    if not obj.clicks and cfg.get("local_at_box_step", "box_center") == "skip" and len(names) > 1:
        names = [n for n in names if n != LOCAL]
    predictions: List[RoIPrediction] = []
    for name in names:
        if budget is not None and not budget.allows(name):
            _say(f"{case.path or case.name}: object {obj.label}: {name} expert skipped to stay within the time budget "
                 f"({budget.elapsed:.1f} s of {budget.seconds:.1f} s used, ~{budget.expected(name):.1f} s needed)")
            continue
        t0 = time.perf_counter()
        prediction = experts[name].predict(_local_view(obj) if name == LOCAL else obj, case.prev_pred)
        if budget is not None:
            budget.record(name, time.perf_counter() - t0)
        if prediction is not None:
            predictions.append(prediction)
    last = _local_view(obj).last_click  # the click the local expert centred on (the box centre at the box step)
    threshold = float(cfg.get("threshold", 0.5))
    fused = fuse_predictions(predictions, cfg.get("fusion", "local_overrides"),
                             click_zyx=last.zyx if last is not None else None,
                             click_positive=last.positive if last is not None else True,
                             threshold=threshold, margin=cfg.get("local_margin", 0.0), copy=False)
    if not cfg.get("honour_clicks", True) or not obj.clicks:
        return fused
    if promise is None:
        promise = promises_of([obj], case.shape)[obj.label]
    return honour_clicks(fused, obj, promise, case.image, case.spacing_zyx, case.prev_pred, threshold,
                         cfg.get("click_correction"))


class DCMPredictor:
    """``case -> segs`` with the configured policy, fusion and overlap rules.

    Args:
        experts: built experts by role (``'global'``, ``'local'``).
        engine_cfg: the ``engine`` config section (missing keys take :data:`ENGINE_DEFAULTS`).
        process_start: ``time.perf_counter()`` at process start, so the first case's budget counts model
            loading; each later case of the same process (a folder of several cases) starts its own clock.
    """

    def __init__(self, experts: Dict[str, Expert], engine_cfg: Optional[Dict[str, Any]] = None,
                 process_start: Optional[float] = None):
        cfg = check_engine_config(engine_cfg)
        self.cfg = cfg
        self.experts = experts
        self.process_start = process_start
        self._first_call = True

    def __call__(self, case: Case) -> np.ndarray:
        """Predict every object of ``case``; returns the (z, y, x) uint8 label map.

        An object whose prompts are unusable (``ObjectPrompts.problem``) or whose prediction raised keeps its
        previous mask exactly: the other objects are written around it. Memory: one label map for the whole
        case, the rest per object on its RoI only.

        Raises:
            DCMError: every object that had prompts failed (a broken model, not one bad object).
        """
        segs = case.prev_pred.copy() if case.prev_pred is not None else np.zeros(case.shape, dtype=np.uint8)
        if not case.objects:
            return segs
        start, self._first_call = (self.process_start if self._first_call else None), False
        budget = CallBudget.for_case(case.num_objects, self.cfg["budget"], start)
        for expert in self.experts.values():
            expert.set_image(case.image, case.spacing_zyx)
        promises = (promises_of([o for o in case.objects if not o.problem], case.shape)
                    if self.cfg["honour_clicks"] else {})
        writer = LabelWriter(segs, self.cfg["overlap"], ClickProtection(promises) if promises else None)
        kept = [obj.label for obj in case.objects if obj.problem]
        attempted, failures = 0, []
        for obj in case.objects:
            if obj.problem or not obj.has_prompt:
                continue
            attempted += 1
            try:
                fused = predict_object(case, obj, self.experts, self.cfg, budget, promises.get(obj.label))
            except Exception as e:  # one object's failure must not cost the others their masks
                failures.append((obj.label, f"{type(e).__name__}: {e}"))
                kept.append(obj.label)
                continue
            if fused is not None:
                writer.write(obj.label, fused, float(self.cfg["threshold"]))
        where = case.path or case.name
        if attempted and len(failures) == attempted:
            raise DCMError(" ".join(f"{where}: prediction failed for every object ({failures[0][1]})".split()))
        for label, reason in failures:
            _say(f"{where}: object {label}: prediction failed ({reason}); its previous mask is kept")
        if kept and case.prev_pred is not None:
            _restore(segs, case.prev_pred, kept)
        return segs


def _restore(segs: np.ndarray, prev_pred: np.ndarray, labels: List[int]) -> None:
    """Put back the previous masks of ``labels`` exactly, each on its own bounding box of ``prev_pred``."""
    from scipy import ndimage  # only on this rare path: SciPy's import costs predict.sh ~0.4 s per call

    boxes = ndimage.find_objects(prev_pred, max_label=max(labels))
    for label in labels:
        box = boxes[label - 1]
        if box is None:
            continue
        segs[box][prev_pred[box] == label] = label
