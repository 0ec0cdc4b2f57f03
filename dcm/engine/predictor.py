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

from dcm.data.cases import Case, Click, ObjectPrompts
from dcm.engine.fusion import FUSION_RULES, OVERLAP_RULES, FusedPrediction, LabelWriter, click_margins, fuse_predictions
from dcm.engine.policies import GLOBAL, LOCAL, route
from dcm.errors import ConfigError, DCMError
from dcm.experts.base import Expert, RoIPrediction

__all__ = ["ENGINE_DEFAULTS", "CallBudget", "DCMPredictor", "predict_object"]

ENGINE_DEFAULTS: Dict[str, Any] = {
    "policy": "dual",
    "fusion": "local_overrides",
    "local_margin": 0.0,
    "without_box": "policy",
    "overlap": "later_wins",
    "local_at_box_step": "box_center",
    "threshold": 0.5,
    "budget": {
        "seconds_per_object": 90.0,
        "calls_per_case": 6,
        "safety": 0.85,
        "expected_seconds": {GLOBAL: 1.0, LOCAL: 5.0},
    },
}


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
    """At the box step the local expert has no click to centre on: it takes the box centre as one."""
    if obj.clicks or obj.box is None:
        return obj
    center = tuple(int(c) for c in obj.box.center_zyx)  # floor of the half-integer centre
    return replace(obj, clicks=[Click(center, True)])  # type: ignore[arg-type]


def predict_object(
    case: Case,
    obj: ObjectPrompts,
    experts: Dict[str, Expert],
    cfg: Dict[str, Any],
    budget: Optional[CallBudget] = None,
) -> Optional[FusedPrediction]:
    """Route one object's prompts to the experts and fuse their answers (None: keep the previous mask).

    Args:
        case: the case; ``case.prev_pred`` is the previous mask the experts read.
        obj: the object.
        experts: ``{'global': ..., 'local': ...}`` (either may be absent).
        cfg: the ``engine`` config section.
        budget: when given, an expert call that would overrun it is skipped with a message.
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
    return fuse_predictions(predictions, cfg.get("fusion", "local_overrides"),
                            click_zyx=last.zyx if last is not None else None,
                            click_positive=last.positive if last is not None else True,
                            threshold=float(cfg.get("threshold", 0.5)), margin=cfg.get("local_margin", 0.0),
                            copy=False)


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
        cfg = {**ENGINE_DEFAULTS, **(engine_cfg or {})}
        cfg["budget"] = {**ENGINE_DEFAULTS["budget"], **((engine_cfg or {}).get("budget") or {})}
        if cfg["fusion"] not in FUSION_RULES:
            raise ConfigError(f"engine.fusion must be one of {FUSION_RULES}, got {cfg['fusion']!r}")
        if cfg["without_box"] not in ("policy", GLOBAL, LOCAL):
            raise ConfigError(f"engine.without_box must be policy, {GLOBAL} or {LOCAL}, got {cfg['without_box']!r}")
        if cfg["overlap"] not in OVERLAP_RULES:
            raise ConfigError(f"engine.overlap must be one of {OVERLAP_RULES}, got {cfg['overlap']!r}")
        try:
            click_margins(cfg["local_margin"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"engine.{e}") from None
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
        writer = LabelWriter(segs, self.cfg["overlap"])
        kept = [obj.label for obj in case.objects if obj.problem]
        attempted, failures = 0, []
        for obj in case.objects:
            if obj.problem or not obj.has_prompt:
                continue
            attempted += 1
            try:
                fused = predict_object(case, obj, self.experts, self.cfg, budget)
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
