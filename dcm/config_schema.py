"""The typed schema of DCM's config sections: every key, its default and its check, written once here.

**Where defaults live.** In this module, in code. A YAML file (``configs/*.yaml``) only overrides: it holds
what a preset changes, and :func:`dcm.config.load_config` fills in the rest from here. Code, not YAML, is
the single home because the library is used without any file too (``DCMPredictor(experts, {})``,
``InteractiveSession(config={...}, experts=...)``, an expert built from a dict): those paths need the same
defaults, typed and next to their checks.

**Layout** (one dataclass per section; nested sections are fields)::

    DCMConfig                  the inference config (predict.sh, dcm.segment, InteractiveSession, evaluator)
      weights, device
      engine: EngineConfig       routing, fusion, overlap, threshold, clicks rule
        click_correction: ClickCorrectionConfig
        budget: BudgetConfig
      global_expert: GlobalExpertConfig
      local_expert: LocalExpertConfig
      session: SessionConfig

Training configs (``configs/train_*.yaml``) have their sections' schemas in the training package
(:mod:`dcm.training.config_schema`, built on :class:`Section`), checked by each trainer when it is constructed;
they are read by the same :func:`dcm.config.load_config`.

Model presets (``configs/models/*.yaml``) are checked by
:func:`dcm.experts.backbones.registry.check_model_preset` against their builders'
own schemas (SAM-Med3D: ``dcm.models.sam_med3d.build.REQUIRED`` / ``DEFAULTS``; VISTA3D:
``dcm.models.vista3d.VISTA3D_DEFAULTS``), so that an expert section's ``model`` is checked before any
network is built.

Every check raises :class:`~dcm.errors.ConfigError` with one line naming the dotted key
(``engine.policy must be one of ...``, ``local_expert.window_size must be ...``).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from dcm.errors import ConfigError
from dcm.prompts import ZYX

#: The values each choice key allows. The modules that implement them (policies, fusion, clicks, the RoI
#: resampler) import them from here, so the checks and the code cannot drift apart.
POLICY_NAMES = ("dual", "released", "global_then_local", "outside_global_roi", "global_only", "local_only")
FUSION_RULES = ("local_overrides", "average", "confidence", "click_region")
OVERLAP_RULES = ("later_wins", "highest_prob", "keep_others")
CORRECTION_METHODS = ("probability", "random_walker")
UPDATE_SCOPES = ("whole", "click_sign", "click_part")
#: what the engine does with an experts' change beyond a cap (engine.removal_beyond_cap / addition_beyond_cap).
BEYOND_CAP = ("trim", "reject", "reject_without_box")
#: ``engine.fallback``: what a failing expert costs (:mod:`dcm.engine.predictor`).
FALLBACKS = ("none", "local_case")
#: ``local_expert.window_inferer``: how the local windows are run (:mod:`dcm.experts.local_roi`).
WINDOW_INFERERS = ("dcm", "released")
#: ``local_expert.point_head``: how VISTA3D's point head runs (:class:`dcm.experts.backbones.Vista3DBackbone`):
#: ``fast``: click-independent part cached per window, fused upscaling (equal to MONAI up to float rounding);
#: ``cached``: click-independent part cached per window, MONAI's upscaling (bit-equal to MONAI);
#: ``monai``: ``PointMappingSAM.forward`` on the cached encoder output at every click (the reference).
POINT_HEAD_MODES = ("fast", "cached", "monai")
ZNORM_MODES = ("monai", "torchio")
#: Where an expert's ``amp`` autocasts (dcm.models.precision implements the rule).
AMP_DEVICES = ("auto", "cuda", "cpu")


def click_margins(margin: Union[float, Sequence[float]]) -> Tuple[float, float]:
    """``(add, remove)`` margins of ``click_region`` from one number (both) or a pair; ValueError otherwise."""
    if isinstance(margin, (int, float)):
        pair = (float(margin), float(margin))
    else:
        values = list(margin)
        if len(values) != 2:
            raise ValueError(f"local_margin must be a number or a pair [add, remove], got {margin!r}")
        pair = (float(values[0]), float(values[1]))
    if not all(0.0 <= m < 0.5 for m in pair):
        raise ValueError(f"local_margin values must lie in [0, 0.5), got {margin!r}")
    return pair


def as_zyx(value: Union[int, Sequence[int]], what: str) -> ZYX:
    """A (z, y, x) size from one int (a cube) or 3 ints; ``ConfigError`` naming ``what`` otherwise."""
    if isinstance(value, numbers.Integral):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an int or 3 ints (z, y, x), got {value!r}") from None
    if len(out) != 3 or min(out) <= 0:
        raise ConfigError(f"{what} must be positive, one int or 3 ints (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


__all__ = [
    "CHALLENGE_SECONDS_PER_OBJECT",
    "Section",
    "ClickCorrectionConfig",
    "BudgetConfig",
    "EngineConfig",
    "GlobalExpertConfig",
    "LocalExpertConfig",
    "SessionConfig",
    "DCMConfig",
    "DCM_SECTIONS",
    "is_dcm_config",
    "check_dcm_config",
]

#: The challenge's time budget per object, summed over the calls of a case (``engine.budget`` default).
CHALLENGE_SECONDS_PER_OBJECT = 90.0

S = TypeVar("S", bound="Section")


def _nested(section: Type["Section"]) -> Any:
    """A dataclass field holding a nested section (its defaults by default)."""
    return field(default_factory=section, metadata={"section": section})


@dataclass
class Section:
    """A config section: its fields are its keys (with their defaults); :meth:`check` validates values.

    Build one with :meth:`from_mapping` (unknown keys refused, nested sections built and checked, values
    checked); read it back as plain nested dicts with :meth:`to_dict`.
    """

    @classmethod
    def keys(cls) -> List[str]:
        """The section's keys, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls: Type[S], data: Optional[Mapping[str, Any]], where: str) -> S:
        """The section from ``data`` (None: all defaults), every key checked.

        Args:
            data: the section as read from YAML or given as a dict.
            where: the section's dotted name, for errors (``engine``, ``engine.budget``); "" for a whole config
                (its sections are then named alone: ``engine.policy``).

        Raises:
            ConfigError: naming the first wrong key (``where.key``).
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where or 'a config'} must be a mapping, got {data!r}")
        known = cls.keys()
        unknown = sorted(str(k) for k in set(data) - set(known))
        if unknown:
            raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(known)}")
        values: Dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            section = f.metadata.get("section")
            key = f"{where}.{f.name}" if where else f.name
            values[f.name] = section.from_mapping(value, key) if section else copy.deepcopy(value)
        built = cls(**values)
        built.check(where)
        return built

    def check(self, where: str) -> None:
        """Validate (and normalise) the values; ConfigError naming ``where.key`` (default: nothing to check)."""

    def to_dict(self) -> Dict[str, Any]:
        """The section as plain nested dicts (what the rest of DCM reads: ``cfg['engine']['policy']``)."""
        out: Dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Section) else copy.deepcopy(value)
        return out


# ------------------------------------------------------------------------------------------------ checks


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, key: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the range; ConfigError naming ``key`` otherwise (bools refused)."""
    ok = _is_number(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{key} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return float(value)


def _choice(value: Any, key: str, allowed: Tuple[Any, ...]) -> None:
    if value not in allowed or isinstance(value, bool):
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _integer(value: Any, key: str, low: int, none_ok: bool = False) -> None:
    import numpy as np

    if value is None and none_ok:
        return
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{key} must be {'None or ' if none_ok else ''}an int >= {low}, got {value!r}")


def _flag(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


# ------------------------------------------------------------------------------------------------ engine


@dataclass
class ClickCorrectionConfig(Section):
    """``engine.click_correction``: how a click that no expert kept is corrected (:mod:`dcm.engine.clicks`)."""

    #: tried in order: random_walker | probability; [] = the click's neighbourhood only (chosen on the
    #: realsets validation split: README "Clicks are kept").
    methods: List[str] = field(default_factory=lambda: ["random_walker"])
    #: half-size of the crop around the click, at most ...
    radius_mm: float = 10.0
    #: ... this times the object's radius (half the box's largest extent, else the radius of a ball as large
    #: as its mask), so small objects get small crops.
    radius_object_factor: float = 1.0
    #: lowered thresholds of the ``probability`` method (negative clicks: 1 - level).
    probability_levels: List[float] = field(default_factory=lambda: [0.3, 0.15, 0.05])
    #: scikit-image's random-walker edge weight.
    random_walker_beta: float = 130.0
    #: negative click: the mask beyond this times the click's depth in it is the object.
    random_walker_depth_factor: float = 2.0
    #: a correction changes at most this fraction of the object's box volume (a larger one is retried on a
    #: crop of half the radius, three times at most, then dropped); 0: no bound. 0.25 chosen on the realsets
    #: validation split (README "Clicks are kept").
    max_box_fraction: float = 0.25
    #: each correction changes at most as many voxels as the click step's removal cap (negative click) or
    #: addition cap (positive click) of ``engine`` allows (a larger one is retried on a smaller crop, as
    #: above); the cap is not shared with the experts' change or other corrections of the step, so a step
    #: may still change more. false: the corrections come on top of the caps.
    within_step_caps: bool = False
    #: a correction changes at most this fraction of the object's previous mask (a larger one is retried on a
    #: smaller crop, as above); 0, or an empty previous mask: no such bound.
    max_mask_fraction: float = 0.0

    def check(self, where: str) -> None:
        methods = self.methods
        if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or \
                any(m not in CORRECTION_METHODS for m in methods):
            raise ConfigError(f"{where}.methods must be a list drawn from {list(CORRECTION_METHODS)}, got {methods!r}")
        radius = self.radius_mm
        if not _is_number(radius) or not 0 < float(radius) <= 200:
            raise ConfigError(f"{where}.radius_mm must be a number in (0, 200], got {radius!r}")
        if not _is_number(self.radius_object_factor) or not float(self.radius_object_factor) > 0:
            raise ConfigError(f"{where}.radius_object_factor must be a number > 0, got {self.radius_object_factor!r}")
        levels = self.probability_levels
        if not isinstance(levels, (list, tuple)) or not levels or \
                any(not _is_number(v) or not 0 < v < 0.5 for v in levels):
            raise ConfigError(f"{where}.probability_levels must be numbers in (0, 0.5), got {levels!r}")
        if not _is_number(self.random_walker_beta) or not float(self.random_walker_beta) > 0:
            raise ConfigError(f"{where}.random_walker_beta must be a number > 0, got {self.random_walker_beta!r}")
        factor = self.random_walker_depth_factor
        if not _is_number(factor) or not float(factor) >= 1:
            raise ConfigError(f"{where}.random_walker_depth_factor must be a number >= 1, got {factor!r}")
        if not _is_number(self.max_box_fraction) or not float(self.max_box_fraction) >= 0:
            raise ConfigError(f"{where}.max_box_fraction must be a number >= 0, got {self.max_box_fraction!r}")
        self.max_box_fraction = float(self.max_box_fraction)
        _flag(self.within_step_caps, f"{where}.within_step_caps")
        if not _is_number(self.max_mask_fraction) or not float(self.max_mask_fraction) >= 0:
            raise ConfigError(f"{where}.max_mask_fraction must be a number >= 0, got {self.max_mask_fraction!r}")
        self.max_mask_fraction = float(self.max_mask_fraction)
        self.methods = list(methods)
        self.radius_mm, self.radius_object_factor = float(radius), float(self.radius_object_factor)
        self.probability_levels = sorted((float(v) for v in levels), reverse=True)
        self.random_walker_beta, self.random_walker_depth_factor = float(self.random_walker_beta), float(factor)


@dataclass
class BudgetConfig(Section):
    """``engine.budget``: the time each call allows itself (:class:`dcm.engine.predictor.CallBudget`)."""

    #: the challenge's budget per object, summed over the ``calls_per_case`` calls of a case.
    seconds_per_object: float = CHALLENGE_SECONDS_PER_OBJECT
    calls_per_case: int = 6
    #: fraction of a call's share we allow ourselves.
    safety: float = 0.85
    #: cost priors (seconds per call) until a call has measured them; given as a whole (not merged).
    expected_seconds: Dict[str, float] = field(default_factory=lambda: {"global": 1.0, "local": 5.0})

    def check(self, where: str) -> None:
        _number(self.seconds_per_object, f"{where}.seconds_per_object", 0.0, 1e6, low_open=True)
        _number(self.safety, f"{where}.safety", 0.0, 1.0, low_open=True)
        calls = self.calls_per_case
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
            raise ConfigError(f"{where}.calls_per_case must be an integer >= 1, got {calls!r}")
        if not isinstance(self.expected_seconds, Mapping):
            raise ConfigError(f"{where}.expected_seconds must be a mapping, got {self.expected_seconds!r}")
        for name, value in self.expected_seconds.items():
            _number(value, f"{where}.expected_seconds.{name}", 0.0, 1e6)


@dataclass
class EngineConfig(Section):
    """``engine``: how each object's prompts are routed to the experts and their answers fused and written."""

    #: dual | released | global_then_local | outside_global_roi | global_only | local_only
    #: (:mod:`dcm.engine.policies`).
    policy: str = "dual"
    #: where both experts cover a voxel: local_overrides | average | confidence | click_region.
    fusion: str = "local_overrides"
    #: click_region: a local change counts where |prob - threshold| > margin; or [add, remove]: apart for
    #: foreground / background clicks.
    local_margin: Any = 0.0
    #: after any fusion rule: within this many voxels (a ball) of each of the object's clicks inside the local
    #: window, the local expert's answer stands (it sees the image at native resolution there). 0: off.
    local_click_radius: float = 0.0
    #: objects without a box (no-box cases): policy (its experts) | local | global; without a box the global
    #: RoI is only a guess around the clicks.
    without_box: str = "policy"
    #: later_wins (released) | highest_prob | keep_others.
    overlap: str = "later_wins"
    #: box_center (the local expert clicks the box centre) | skip.
    local_at_box_step: str = "box_center"
    threshold: float = 0.5
    #: keep every click (README "Clicks are kept"); false: the experts' answer as it is.
    honour_clicks: bool = True
    #: what a click step may change of an object's mask (with ``honour_clicks``): whole (the experts' answer
    #: anywhere) | click_sign (a positive click only adds, a negative one only removes) | click_part (and only
    #: the connected part of that change at the newest click) (:mod:`dcm.engine.clicks`).
    update_scope: str = "whole"
    #: the most the experts' answer may remove in one click step of an object's previous mask, as a
    #: fraction of it (with ``honour_clicks``; the click corrections come on top): beyond it, the removed
    #: voxels farthest from the newest click keep the previous mask (with ``removal_beyond_cap: trim``).
    #: 0: no limit (:mod:`dcm.engine.clicks`).
    #: 0.25: chosen on the validation split of the real images.
    max_removal: float = 0.25
    #: what becomes of a removal beyond ``max_removal``: trim (the removed voxels nearest the newest click are
    #: taken up to the cap) | reject (none is taken: an answer that removes more than the cap is treated as a
    #: collapse, and the click gets its correction instead) | reject_without_box (reject for objects without
    #: a box, trim for the others). configs/dcm_small.yaml sets reject_without_box (chosen there, where the
    #: local expert alone answers objects without a box: README "Beyond a cap").
    removal_beyond_cap: str = "trim"
    #: the most the other objects' answers may take of an object's previous mask in one click step of
    #: predict.sh / the evaluator (not the box step: no previous masks), as a fraction of it (with
    #: ``honour_clicks``; the label writer keeps the claimed voxels farthest from the taking object's newest
    #: click with their object). 0: no limit. 0.01 (an object all but keeps its previous voxels once it has
    #: them; one under 100 voxels keeps all of them): chosen on the validation split of the real images among
    #: 0.25, 0.1, 0.05, 0.02, 0.01, 0.005.
    max_taken: float = 0.01
    #: the most the experts' answer may add in one click step to an object's previous mask (the click
    #: corrections come on top), as a multiple of the larger of that mask and ``addition_floor`` times the
    #: object's box volume (with ``honour_clicks``; an empty previous mask is not capped): beyond it, the added
    #: voxels farthest from the newest click stay as they were. 0: no limit. 2: chosen on the validation split.
    max_addition: float = 2.0
    #: the addition cap's floor, a fraction of the object's box volume (0 without a box), so that a small mask
    #: in a large box is not held back for several clicks (README "Addition cap").
    addition_floor: float = 0.25
    #: what becomes of an addition beyond ``max_addition``: trim | reject | reject_without_box (as
    #: ``removal_beyond_cap``).
    addition_beyond_cap: str = "trim"
    #: none: an object whose expert raises keeps its previous mask. local_case (the released predict.sh's
    #: except branch): a case without boxes, or one on which the global expert raised, is predicted again by
    #: the local expert alone, every object from its clicks on an empty label map (previous masks ignored).
    fallback: str = "none"
    click_correction: ClickCorrectionConfig = _nested(ClickCorrectionConfig)
    budget: BudgetConfig = _nested(BudgetConfig)

    def check(self, where: str) -> None:
        choices = {"policy": POLICY_NAMES, "fusion": FUSION_RULES, "overlap": OVERLAP_RULES,
                   "without_box": ("policy", "global", "local"), "local_at_box_step": ("box_center", "skip"),
                   "update_scope": UPDATE_SCOPES, "fallback": FALLBACKS,
                   "removal_beyond_cap": BEYOND_CAP, "addition_beyond_cap": BEYOND_CAP}
        for key, allowed in choices.items():
            value = getattr(self, key)
            if not isinstance(value, str) or value not in allowed:
                raise ConfigError(f"{where}.{key} must be one of {list(allowed)}, got {value!r}")
        try:
            click_margins(self.local_margin)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.{e}") from None
        self.threshold = _number(self.threshold, f"{where}.threshold", 0.0, 1.0, low_open=True, high_open=True)
        self.local_click_radius = _number(self.local_click_radius, f"{where}.local_click_radius", 0.0, 1e4)
        self.max_removal = _number(self.max_removal, f"{where}.max_removal", 0.0, 1.0)
        self.max_taken = _number(self.max_taken, f"{where}.max_taken", 0.0, 1.0)
        self.max_addition = _number(self.max_addition, f"{where}.max_addition", 0.0, 1e3)
        self.addition_floor = _number(self.addition_floor, f"{where}.addition_floor", 0.0, 1.0)
        _flag(self.honour_clicks, f"{where}.honour_clicks")


# ------------------------------------------------------------------------------------------------ experts


@dataclass
class _ExpertConfig(Section):
    """Keys both expert sections have: the backbone, its model preset and how it runs."""

    #: the expert's role in the combined checkpoint and in errors; set by each subclass.
    role: ClassVar[str] = "expert"

    def check_backbone(self, where: str) -> None:
        """The backbone settings shared by both experts (backbone, znorm, percentiles, amp, model, ...)."""
        _choice(self.backbone, f"{where}.backbone", ("sam_med3d", "vista3d"))
        _choice(self.znorm, f"{where}.znorm", ZNORM_MODES)
        _choice(str(self.amp_dtype), f"{where}.amp_dtype", ("float16", "bfloat16"))
        _choice(self.amp_device, f"{where}.amp_device", AMP_DEVICES)
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            raise ConfigError(f"{where}.channels_last must be one of ['auto', True, False], got {self.channels_last!r}")
        for key in ("amp", "onednn", "compile", "init_partial"):
            _flag(getattr(self, key), f"{where}.{key}")
        try:
            lower, upper = (float(p) for p in self.percentiles)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.percentiles must be two numbers (lower, upper), "
                              f"got {self.percentiles!r}") from None
        if not 0.0 <= lower < upper <= 100.0:
            raise ConfigError(f"{where}.percentiles must satisfy 0 <= lower < upper <= 100, got {self.percentiles!r}")
        if self.model is not None and not isinstance(self.model, (str, Mapping)):
            raise ConfigError(f"{where}.model must be a preset name, a YAML path or a mapping, got {self.model!r}")
        if self.checkpoint_key is not None and not isinstance(self.checkpoint_key, str):
            raise ConfigError(f"{where}.checkpoint_key must be a string or null, got {self.checkpoint_key!r}")


@dataclass
class GlobalExpertConfig(_ExpertConfig):
    """``global_expert``: the object's whole RoI resampled to a cubic frame (:mod:`dcm.experts.global_roi`)."""

    role: ClassVar[str] = "global_expert"

    #: the network on the frame: sam_med3d (DCM's released pairing) | vista3d (the design card's).
    backbone: str = "sam_med3d"
    #: side of the cubic frame; None: the backbone's own (SAM-Med3D: its img_size, the only size it takes;
    #: VISTA3D: 128). VISTA3D takes any multiple of its factor (16 full, 8 reduced).
    frame_size: Optional[int] = None
    #: box rule: RoI extent = round((max - min + 1) * box_scale), at least min_size voxels per axis.
    box_scale: float = 1.8
    min_size: int = 8
    #: objects without a box: RoI of this many mm per axis around the first positive click (64 / spacing x 1.5).
    noboxes_size_mm: float = 96.0
    #: grow the RoI to take in positive clicks outside it; margin = ceil(grow_margin x RoI extent) voxels.
    grow: bool = True
    grow_margin: float = 0.1
    #: the box centre as the first positive click (DCM); ignored for objects without a box.
    box_center_click: bool = True
    #: clicks outside the RoI (negative ones; positive ones too with grow false): drop | clip (onto the frame's
    #: border) | keep (passed at their frame coordinates outside the frame, as the released expert does).
    outside_clicks: str = "drop"
    #: mask prompt at the box step (no click yet): zeros (DCM training's step 0) | none (SAM-Med3D only).
    mask_prompt_at_box_step: Optional[str] = "zeros"
    #: resampling of the image into the frame and of the probabilities back: trilinear | nearest.
    image_interpolation: str = "trilinear"
    prob_interpolation: str = "trilinear"
    #: SAM-Med3D's z-normalisation over voxels > 0: torchio (released) | monai.
    znorm: str = "torchio"
    #: VISTA3D's normalisation: these percentiles of the whole image mapped to [0, 1].
    percentiles: Tuple[float, float] = (1.0, 99.0)
    #: image embeddings kept (one per RoI; several objects in a session).
    cache_size: int = 4
    device: str = "cpu"
    #: autocast to amp_dtype (float16 | bfloat16) where amp_device allows: auto (CUDA, and a CPU that computes
    #: amp_dtype natively: avx512_bf16 / AMX for bfloat16) | cuda | cpu (any CPU: emulated bf16 is slow).
    #: false: float32 on every device. Probabilities are float32 either way.
    amp: bool = False
    amp_dtype: str = "float16"
    amp_device: str = "auto"
    #: 3D convolution weights (and activations) channels-last 3D: auto (a convolutional backbone, VISTA3D,
    #: under CPU bfloat16 autocast, where it pays) | true | false.
    channels_last: Any = "auto"
    #: CPU float32 3D convolutions on oneDNN (dcm/models/onednn.py); false: PyTorch's own kernel choice.
    onednn: bool = True
    #: torch.compile the image encoder (compiles on first use; for long GPU sessions).
    compile: bool = False
    #: model preset (name in configs/models, YAML path or dict); None: sam_med3d_64 / vista3d132 by backbone.
    model: Any = None
    #: the expert's entry in the combined checkpoint (by role, whatever the backbone).
    checkpoint_key: Optional[str] = "model_state_dict"
    #: load by name + shape with a printed report (SAM-Med3D only, e.g. turbo -> 64 / 8).
    init_partial: bool = False

    def check(self, where: str) -> None:
        for key, low_open in (("box_scale", True), ("noboxes_size_mm", True), ("grow_margin", False)):
            value = getattr(self, key)
            if not _is_number(value) or not (value > 0 if low_open else value >= 0):
                raise ConfigError(f"{where}.{key} must be a number {'>' if low_open else '>='} 0, got {value!r}")
        _integer(self.min_size, f"{where}.min_size", 1)
        _integer(self.cache_size, f"{where}.cache_size", 1)
        _integer(self.frame_size, f"{where}.frame_size", 1, none_ok=True)
        _flag(self.grow, f"{where}.grow")
        _flag(self.box_center_click, f"{where}.box_center_click")
        _choice(self.outside_clicks, f"{where}.outside_clicks", ("drop", "clip", "keep"))
        _choice(self.mask_prompt_at_box_step, f"{where}.mask_prompt_at_box_step", ("zeros", "none", None))
        for key in ("image_interpolation", "prob_interpolation"):
            _choice(getattr(self, key), f"{where}.{key}", ("trilinear", "nearest"))
        self.check_backbone(where)


@dataclass
class LocalExpertConfig(_ExpertConfig):
    """``local_expert``: a window centred at the object's last click (:mod:`dcm.experts.local_roi`)."""

    role: ClassVar[str] = "local_expert"

    #: the network on the window: vista3d (DCM's released pairing) | sam_med3d (the design card's).
    backbone: str = "vista3d"
    #: (z, y, x) window size, or one int for a cube; None: the backbone's own (VISTA3D: 128; SAM-Med3D: its
    #: img_size, the only size it takes). VISTA3D needs multiples of 16 (vista3d132) / 8 (reduced).
    window_size: Any = None
    #: clicks given to the backbone: inside_window (released inferer) | last.
    clicks: str = "inside_window"
    #: dcm: one window at the last click, run by DCM's pipeline (encoder output cached). released: MONAI's
    #: point_based_window_inferer as the released DCM calls it (VISTA3D only): one window per click, each
    #: given the object's clicks inside it except one on its first voxel, overlapping logits summed, no
    #: previous mask, no cache; ``clicks`` and ``reuse_window_margin`` do not apply.
    window_inferer: str = "dcm"
    #: VISTA3D's point head: fast (about 5x faster per click) | cached (bit-equal to MONAI) | monai (MONAI's
    #: forward at every click); see POINT_HEAD_MODES.
    point_head: str = "fast"
    #: the box centre as a positive click for an object that has a box but no click yet.
    box_center_as_click: bool = False
    #: None: every window centred at the last click (DCM). An int m: keep the previous window (and its
    #: cached encoder output) while the last click lies >= m voxels inside its inner edges.
    reuse_window_margin: Optional[int] = None
    #: VISTA3D's normalisation: these percentiles of the whole image mapped to 0 and 1.
    percentiles: Tuple[float, float] = (1.0, 99.0)
    #: SAM-Med3D's z-normalisation over voxels > 0 of the window: torchio | monai.
    znorm: str = "torchio"
    #: SAM-Med3D's mask prompt: previous (the object's previous mask in the window) | none. VISTA3D takes none.
    mask_prompt: Optional[str] = "previous"
    device: str = "cpu"
    #: as global_expert's.
    amp: bool = False
    amp_dtype: str = "float16"
    amp_device: str = "auto"
    channels_last: Any = "auto"
    onednn: bool = True
    compile: bool = False
    #: model preset (name, YAML path or dict); None: vista3d132 / sam_med3d_64 by backbone.
    model: Any = None
    checkpoint_key: Optional[str] = "model"
    init_partial: bool = False

    def check(self, where: str) -> None:
        if self.window_size is not None:
            as_zyx(self.window_size, f"{where}.window_size")
        _choice(self.clicks, f"{where}.clicks", ("inside_window", "last"))
        _choice(self.window_inferer, f"{where}.window_inferer", WINDOW_INFERERS)
        _choice(self.point_head, f"{where}.point_head", POINT_HEAD_MODES)
        _flag(self.box_center_as_click, f"{where}.box_center_as_click")
        _integer(self.reuse_window_margin, f"{where}.reuse_window_margin", 0, none_ok=True)
        _choice(self.mask_prompt, f"{where}.mask_prompt", ("previous", "none", None))
        self.check_backbone(where)
        if self.window_inferer == "released" and self.backbone != "vista3d":
            raise ConfigError(f"{where}.window_inferer released runs MONAI's VISTA3D point inferer: it needs "
                              f"{where}.backbone vista3d, got {self.backbone!r}")


@dataclass
class SessionConfig(Section):
    """``session``: settings of :class:`dcm.engine.session.InteractiveSession` only."""

    #: objects never take each other's voxels (the engine's overlap rule becomes keep_others).
    no_overlap: bool = False

    def check(self, where: str) -> None:
        _flag(self.no_overlap, f"{where}.no_overlap")


@dataclass
class DCMConfig(Section):
    """A whole DCM inference config (``configs/dcm*.yaml``)."""

    #: combined checkpoint of both experts (global under model_state_dict, local under model); a path
    #: relative to the working folder or to the repository.
    weights: Optional[str] = None
    #: auto | cpu | cuda[:N]
    device: Optional[str] = "auto"
    engine: EngineConfig = _nested(EngineConfig)
    global_expert: GlobalExpertConfig = _nested(GlobalExpertConfig)
    local_expert: LocalExpertConfig = _nested(LocalExpertConfig)
    session: SessionConfig = _nested(SessionConfig)

    def check(self, where: str) -> None:
        if self.weights is not None and not isinstance(self.weights, str):
            raise ConfigError(f"weights must be a file path or null, got {self.weights!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")


#: The top-level sections that make a config an inference config (checked against :class:`DCMConfig`).
DCM_SECTIONS = ("engine", "global_expert", "local_expert", "session")


def is_dcm_config(cfg: Mapping[str, Any]) -> bool:
    """Whether ``cfg`` is an inference config: it has one of :data:`DCM_SECTIONS`, or no key that
    :class:`DCMConfig` lacks (``{}``, ``{weights: ...}``). Training configs (``train``, ``data``, ``model``) are not."""
    return any(key in cfg for key in DCM_SECTIONS) or set(cfg) <= set(DCMConfig.keys())


def check_dcm_config(cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The whole inference config, every section checked, every default filled in, as plain nested dicts.

    Raises:
        ConfigError: naming the first wrong key (``local_expert.window_size must be ...``).
    """
    return DCMConfig.from_mapping(cfg, "").to_dict()
