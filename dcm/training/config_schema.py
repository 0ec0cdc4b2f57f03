"""The typed schema of the training configs (``configs/train_*.yaml``): every key, its default and its check.

**Where defaults live.** Here, once, as dataclass field defaults; the trainers read the checked sections
(``trainer.train.epochs``), never ``cfg.get(key, default)``. A YAML file overrides what its recipe sets
(the released values are written there on purpose, as documentation of the recipe).

**Layout** (sections built with :meth:`dcm.config_schema.Section.from_mapping`: unknown keys refused, values
checked, each error one line naming the dotted key, e.g. ``train.lr_encoderr: unknown key(s) ...``)::

    TrainConfig                     keys every trainer reads (dcm.training.trainer.Trainer)
      SingleLRTrainConfig           + lr (one parameter group; the base Trainer, e.g. the tests' toy trainer)
        LocalTrainConfig            + min_lr_factor, freeze_class_head, init_* (dcm.training.local_roi)
      GlobalTrainConfig             + lr_encoder, lr_decoder, milestones, gamma (dcm.training.global_roi)
    LocalInteractionConfig          ``interaction`` of the local-RoI trainer
    LocalDataConfig                 ``data`` of the local-RoI trainer
      augment: LocalAugmentConfig
    GlobalInteractionConfig         ``interaction`` of the global-RoI trainer
    GlobalDataConfig                ``data`` of the global-RoI trainer
      augment: GlobalAugmentConfig  (flip, elastic, affine, intensity, znorm)

The sections are checked when a trainer is constructed, before any model is built or data is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from dcm.config_schema import ZNORM_MODES, Section, _choice, _flag, _integer, _is_number, _nested, as_zyx
from dcm.errors import ConfigError

__all__ = [
    "ZOOM_DRAWS",
    "PADDING_MODES",
    "TrainConfig",
    "SingleLRTrainConfig",
    "LocalTrainConfig",
    "GlobalTrainConfig",
    "LocalInteractionConfig",
    "LocalAugmentConfig",
    "LocalDataConfig",
    "GlobalInteractionConfig",
    "GlobalAugmentConfig",
    "GlobalDataConfig",
]

#: ``data.augment.affine.zoom_draw``: ``scale`` draws the image zoom U(1 - s, 1 + s) (torchio, released),
#: ``inverse`` its reciprocal (MONAI ``RandAffine``'s grid factor; this project's recipe before issue 14).
ZOOM_DRAWS = ("scale", "inverse")
#: ``grid_sample`` padding modes of the spatial augmentations.
PADDING_MODES = ("zeros", "border", "reflection")
#: ``data.validate`` of the local-RoI data.
VALIDATE_MODES = ("header", "full", "none")


# ------------------------------------------------------------------------------------------------ checks


def _positive(value: Any, key: str) -> None:
    if not _is_number(value) or not value > 0:
        raise ConfigError(f"{key} must be a number > 0, got {value!r}")


def _non_negative(value: Any, key: str, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if not _is_number(value) or not value >= 0:
        raise ConfigError(f"{key} must be {'null or ' if none_ok else ''}a number >= 0, got {value!r}")


def _probability(value: Any, key: str) -> None:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ConfigError(f"{key} must be a probability in [0, 1], got {value!r}")


def _text(value: Any, key: str, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be {'null or ' if none_ok else ''}a non-empty string, got {value!r}")


def _numbers(value: Any, key: str, length: int, low: float = -float("inf")) -> None:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length or \
            any(not _is_number(v) or v < low for v in value):
        raise ConfigError(f"{key} must be {length} numbers{f' >= {low:g}' if low > -float('inf') else ''}, "
                          f"got {value!r}")


# ------------------------------------------------------------------------------------------------ train


@dataclass
class TrainConfig(Section):
    """``train`` keys every trainer reads (:class:`dcm.training.trainer.Trainer`)."""

    work_dir: str = "work_dirs/run"
    seed: int = 0
    epochs: int = 1
    #: stop after this many optimizer steps (None: run every epoch).
    max_steps: Optional[int] = None
    #: per process.
    batch_size: int = 1
    num_workers: int = 0
    accumulation_steps: int = 1
    #: CUDA only.
    amp: bool = True
    #: gradient-norm clip (None: off).
    grad_clip: Optional[float] = None
    weight_decay: float = 0.0
    #: optimizer steps, linear warm-up.
    warmup_steps: int = 0
    #: also at every epoch end; 0: epoch ends only.
    checkpoint_every_steps: int = 0
    #: 0 means the default 10.
    log_every_steps: int = 10
    #: 0 means every epoch (``(epoch + 1) % (n or 1)``).
    figure_every_epochs: int = 1
    #: a checkpoint path, ``auto`` (work_dir/latest.pt) or None.
    resume: Optional[str] = None
    #: weights to start from (None: the builder's init).
    init_from: Optional[str] = None
    #: auto | cpu | cuda | cuda:N.
    device: str = "auto"
    find_unused_parameters: bool = False
    #: optimizer steps per batch.
    steps_per_patch: int = 1
    #: BCE on each click's neighbourhood (:mod:`dcm.training.clicks`); 0: off.
    click_loss_weight: float = 0.0
    #: voxels (1: the click and its 6 face neighbours).
    click_loss_radius: float = 1.0

    def check(self, where: str) -> None:
        _text(self.work_dir, f"{where}.work_dir")
        _integer(self.seed, f"{where}.seed", 0)
        _integer(self.epochs, f"{where}.epochs", 1)
        _integer(self.max_steps, f"{where}.max_steps", 1, none_ok=True)
        _integer(self.batch_size, f"{where}.batch_size", 1)
        _integer(self.num_workers, f"{where}.num_workers", 0)
        _integer(self.accumulation_steps, f"{where}.accumulation_steps", 1)
        _flag(self.amp, f"{where}.amp")
        if self.grad_clip is not None:
            _positive(self.grad_clip, f"{where}.grad_clip")
        _non_negative(self.weight_decay, f"{where}.weight_decay")
        _integer(self.warmup_steps, f"{where}.warmup_steps", 0)
        _integer(self.checkpoint_every_steps, f"{where}.checkpoint_every_steps", 0)
        _integer(self.log_every_steps, f"{where}.log_every_steps", 0)
        _integer(self.figure_every_epochs, f"{where}.figure_every_epochs", 0)
        _text(self.resume, f"{where}.resume", none_ok=True)
        _text(self.init_from, f"{where}.init_from", none_ok=True)
        _text(self.device, f"{where}.device")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{where}.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _flag(self.find_unused_parameters, f"{where}.find_unused_parameters")
        _integer(self.steps_per_patch, f"{where}.steps_per_patch", 1)
        _non_negative(self.click_loss_weight, f"{where}.click_loss_weight")
        _non_negative(self.click_loss_radius, f"{where}.click_loss_radius")


@dataclass
class SingleLRTrainConfig(TrainConfig):
    """``train`` of a trainer with one parameter group (the base :class:`~dcm.training.trainer.Trainer`)."""

    lr: float = 1e-4

    def check(self, where: str) -> None:
        super().check(where)
        _positive(self.lr, f"{where}.lr")


@dataclass
class LocalTrainConfig(SingleLRTrainConfig):
    """``train`` of :class:`dcm.training.local_roi.LocalRoITrainer` (warm-up cosine schedule)."""

    #: the cosine's floor, a fraction of lr.
    min_lr_factor: float = 0.0
    #: freeze the parameters point-only training never uses; false turns on find_unused_parameters.
    freeze_class_head: bool = True
    #: the checkpoint entry holding VISTA3D, used when present (None: the whole file).
    init_key: Optional[str] = "model"
    init_strict: bool = True
    #: allow a full pickle load of ``init_from``.
    init_trusted: bool = False

    def check(self, where: str) -> None:
        super().check(where)
        if not _is_number(self.min_lr_factor) or not 0 <= self.min_lr_factor <= 1:
            raise ConfigError(f"{where}.min_lr_factor must be a number in [0, 1], got {self.min_lr_factor!r}")
        _flag(self.freeze_class_head, f"{where}.freeze_class_head")
        _text(self.init_key, f"{where}.init_key", none_ok=True)
        _flag(self.init_strict, f"{where}.init_strict")
        _flag(self.init_trusted, f"{where}.init_trusted")


@dataclass
class GlobalTrainConfig(TrainConfig):
    """``train`` of :class:`dcm.training.global_roi.GlobalRoITrainer` (two groups, warm-up multistep)."""

    #: image encoder (required).
    lr_encoder: Optional[float] = None
    #: prompt encoder + mask decoder (required).
    lr_decoder: Optional[float] = None
    #: epochs at which the learning rates are multiplied by gamma.
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1

    def check(self, where: str) -> None:
        super().check(where)
        for key in ("lr_encoder", "lr_decoder"):
            if getattr(self, key) is None:
                raise ConfigError(f"{where}.{key}: missing (a learning rate > 0)")
            _positive(getattr(self, key), f"{where}.{key}")
        milestones = self.milestones
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, (list, tuple)):
            raise ConfigError(f"{where}.milestones must be a list of epochs, got {milestones!r}")
        for m in milestones:
            _integer(m, f"{where}.milestones", 1)
        if list(milestones) != sorted(milestones):
            raise ConfigError(f"{where}.milestones must be increasing, got {milestones!r}")
        if not _is_number(self.gamma) or not 0 < self.gamma <= 1:
            raise ConfigError(f"{where}.gamma must be a number in (0, 1], got {self.gamma!r}")
        self.milestones = [int(m) for m in milestones]


# ------------------------------------------------------------------------------------------------ local RoI


@dataclass
class LocalInteractionConfig(Section):
    """``interaction`` of the local-RoI trainer (released values as defaults)."""

    #: objects prompted per patch (released max_prompt 10).
    max_prompt: int = 10
    #: voxels an object needs inside the patch to be prompted.
    min_object_voxels: int = 1
    #: protocol: the organisers' rule on an empty prediction; random: any object voxel.
    first_click: str = "protocol"
    #: corrective clicks after the first (released max_point 5).
    num_clicks: int = 5
    #: mean | sum of the per-step DiceCE losses.
    step_loss: str = "mean"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0

    def check(self, where: str) -> None:
        _integer(self.max_prompt, f"{where}.max_prompt", 1)
        _integer(self.min_object_voxels, f"{where}.min_object_voxels", 0)
        _choice(self.first_click, f"{where}.first_click", ("protocol", "random"))
        _integer(self.num_clicks, f"{where}.num_clicks", 0)
        _choice(self.step_loss, f"{where}.step_loss", ("mean", "sum"))
        _non_negative(self.lambda_dice, f"{where}.lambda_dice")
        _non_negative(self.lambda_ce, f"{where}.lambda_ce")


@dataclass
class ScaleIntensityConfig(Section):
    """``data.augment.scale_intensity``: MONAI ``RandScaleIntensityd``."""

    factors: float = 0.2
    prob: float = 0.2

    def check(self, where: str) -> None:
        _non_negative(self.factors, f"{where}.factors")
        _probability(self.prob, f"{where}.prob")


@dataclass
class ShiftIntensityConfig(Section):
    """``data.augment.shift_intensity``: MONAI ``RandShiftIntensityd``."""

    offsets: float = 0.2
    prob: float = 0.2

    def check(self, where: str) -> None:
        _non_negative(self.offsets, f"{where}.offsets")
        _probability(self.prob, f"{where}.prob")


@dataclass
class GaussianNoiseConfig(Section):
    """``data.augment.gaussian_noise``: MONAI ``RandGaussianNoised``."""

    mean: float = 0.0
    std: float = 0.2
    prob: float = 0.2

    def check(self, where: str) -> None:
        if not _is_number(self.mean):
            raise ConfigError(f"{where}.mean must be a number, got {self.mean!r}")
        _non_negative(self.std, f"{where}.std")
        _probability(self.prob, f"{where}.prob")


@dataclass
class Rot90Config(Section):
    """``data.augment.rot90``: MONAI ``RandRotate90d`` in each plane, a (z, y, x) axis pair."""

    prob: float = 0.2
    max_k: int = 3
    #: released: RandRotate90d's default axes (0, 1), the (z, y) plane.
    planes: List[List[int]] = field(default_factory=lambda: [[0, 1]])

    def check(self, where: str) -> None:
        _probability(self.prob, f"{where}.prob")
        _integer(self.max_k, f"{where}.max_k", 1)
        planes = self.planes
        ok = isinstance(planes, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(a in (0, 1, 2) and not isinstance(a, bool) for a in p)
            and p[0] != p[1] for p in planes)
        if not ok:
            raise ConfigError(f"{where}.planes must be a list of (z, y, x) axis pairs like [0, 1], got {planes!r}")
        self.planes = [[int(a) for a in p] for p in planes]


@dataclass
class LocalAugmentConfig(Section):
    """``data.augment`` of the local-RoI trainer (released: all of these, each with probability 0.2)."""

    scale_intensity: ScaleIntensityConfig = _nested(ScaleIntensityConfig)
    shift_intensity: ShiftIntensityConfig = _nested(ShiftIntensityConfig)
    gaussian_noise: GaussianNoiseConfig = _nested(GaussianNoiseConfig)
    #: per axis (z, y, x).
    flip_prob: float = 0.2
    rot90: Rot90Config = _nested(Rot90Config)

    def check(self, where: str) -> None:
        _probability(self.flip_prob, f"{where}.flip_prob")


@dataclass
class LocalDataConfig(Section):
    """``data`` of the local-RoI trainer (:class:`dcm.training.local_roi.LocalRoIDataset`)."""

    #: a folder of challenge training ``.npz`` cases (required when the data are read).
    data_dir: Optional[str] = None
    pattern: str = "*.npz"
    #: passes over the case list per epoch.
    repeats: int = 1
    #: start-up check of the cases: header | full | none.
    validate: str = "header"
    #: (z, y, x) patch, one int (a cube) or 3 (released 128^3).
    patch_size: Any = 128
    #: whole-volume percentiles mapped to [0, 1].
    percentiles: List[float] = field(default_factory=lambda: [1.0, 99.0])
    #: RandCropByLabelClassesd ratio of background centres (each object class has 1).
    crop_background_ratio: float = 1.0
    augment: LocalAugmentConfig = _nested(LocalAugmentConfig)

    def check(self, where: str) -> None:
        _text(self.data_dir, f"{where}.data_dir", none_ok=True)
        _text(self.pattern, f"{where}.pattern")
        _integer(self.repeats, f"{where}.repeats", 1)
        _choice(self.validate, f"{where}.validate", VALIDATE_MODES)
        as_zyx(self.patch_size, f"{where}.patch_size")
        _numbers(self.percentiles, f"{where}.percentiles", 2)
        lower, upper = (float(p) for p in self.percentiles)
        if not 0.0 <= lower < upper <= 100.0:
            raise ConfigError(f"{where}.percentiles must satisfy 0 <= lower < upper <= 100, got {[lower, upper]}")
        self.percentiles = [lower, upper]
        _non_negative(self.crop_background_ratio, f"{where}.crop_background_ratio")

    @property
    def patch_zyx(self):
        """``patch_size`` as a (z, y, x) tuple."""
        return as_zyx(self.patch_size, "data.patch_size")


# ------------------------------------------------------------------------------------------------ global RoI


@dataclass
class GlobalInteractionConfig(Section):
    """``interaction`` of the global-RoI trainer (released values as defaults).

    ``candidate_weight``: the factor on each correction step's loss (DiceCE averaged over its B * K
    candidates). None means K, as released: a correction step adds K times its mean candidate loss, i.e. the
    sum over its K candidates (per sample), while the centre-click step adds its loss once; the total is
    divided by ``num_steps + 1``. With 5 steps and K = 6 the correction steps carry 30 / 31 of the gradient.
    ``record_masks``: also keep every step's candidate region, previous mask and candidate masks in
    ``last_clicks`` (tests, debugging; costs memory).
    """

    #: correction steps after the centre click.
    num_steps: int = 5
    #: K candidate clicks per step, run as one batch.
    num_candidates: int = 6
    #: Gaussian smoothing of the error map.
    error_sigma: float = 1.0
    #: kernel radius in sigmas.
    error_truncated: float = 5.0
    #: candidate region: smoothed error >= max(top_n-th largest, min_threshold).
    top_n: int = 64
    min_threshold: float = 0.3
    candidate_weight: Optional[float] = None
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    record_masks: bool = False

    def check(self, where: str) -> None:
        _integer(self.num_steps, f"{where}.num_steps", 0)
        _integer(self.num_candidates, f"{where}.num_candidates", 1)
        _positive(self.error_sigma, f"{where}.error_sigma")
        _positive(self.error_truncated, f"{where}.error_truncated")
        _integer(self.top_n, f"{where}.top_n", 1)
        _probability(self.min_threshold, f"{where}.min_threshold")
        _non_negative(self.candidate_weight, f"{where}.candidate_weight", none_ok=True)
        _non_negative(self.lambda_dice, f"{where}.lambda_dice")
        _non_negative(self.lambda_ce, f"{where}.lambda_ce")
        _flag(self.record_masks, f"{where}.record_masks")

    @property
    def step_weight(self) -> float:
        """The factor on each correction step's loss (``candidate_weight``, None: K)."""
        return float(self.num_candidates if self.candidate_weight is None else self.candidate_weight)


@dataclass
class FlipConfig(Section):
    """``data.augment.flip``: one ``RandFlipd`` per axis."""

    enabled: bool = True
    #: per axis, independently.
    prob: float = 0.5

    def check(self, where: str) -> None:
        _flag(self.enabled, f"{where}.enabled")
        _probability(self.prob, f"{where}.prob")


@dataclass
class ElasticConfig(Section):
    """``data.augment.elastic``: :class:`dcm.training.spatial.RandBSplineElasticd` (torchio's draw)."""

    enabled: bool = True
    prob: float = 1.0
    #: per axis, borders included (released 7).
    control_points: int = 7
    #: outermost control points per side held at zero displacement (released 2).
    locked_borders: int = 2
    #: (z, y, x) axes locked (torchio locks its first two array axes).
    locked_axes: List[int] = field(default_factory=lambda: [0, 1])
    #: voxels, U(-max, max) per control point and axis.
    max_displacement: float = 7.5
    padding_mode: str = "border"
    #: fold guard: shrink the draw while det(Jacobian) <= this at some voxel.
    min_jacobian: float = 0.05
    #: factor per guard pass.
    shrink: float = 0.5

    def check(self, where: str) -> None:
        _flag(self.enabled, f"{where}.enabled")
        _probability(self.prob, f"{where}.prob")
        _integer(self.control_points, f"{where}.control_points", 4)
        _integer(self.locked_borders, f"{where}.locked_borders", 0)
        axes = self.locked_axes
        if not isinstance(axes, (list, tuple)) or any(a not in (0, 1, 2) or isinstance(a, bool) for a in axes):
            raise ConfigError(f"{where}.locked_axes must be a list of axes in 0, 1, 2, got {axes!r}")
        _non_negative(self.max_displacement, f"{where}.max_displacement")
        _choice(self.padding_mode, f"{where}.padding_mode", PADDING_MODES)
        if not _is_number(self.min_jacobian) or not self.min_jacobian < 1:
            raise ConfigError(f"{where}.min_jacobian must be a number < 1, got {self.min_jacobian!r}")
        if not _is_number(self.shrink) or not 0 < self.shrink < 1:
            raise ConfigError(f"{where}.shrink must be a number in (0, 1), got {self.shrink!r}")


@dataclass
class AffineConfig(Section):
    """``data.augment.affine``: :class:`dcm.training.spatial.RandZoomTranslated`."""

    enabled: bool = True
    prob: float = 1.0
    #: image zoom per (z, y, x) axis.
    scales: List[float] = field(default_factory=lambda: [0.2, 0.5, 0.5])
    #: scale: zoom ~ U(1 - s, 1 + s) (released); inverse: 1 / U(1 - s, 1 + s).
    zoom_draw: str = "scale"
    #: voxels, U(-t, t) per axis.
    translation: List[float] = field(default_factory=lambda: [4, 4, 4])
    padding_mode: str = "zeros"

    def check(self, where: str) -> None:
        _flag(self.enabled, f"{where}.enabled")
        _probability(self.prob, f"{where}.prob")
        _numbers(self.scales, f"{where}.scales", 3, low=0.0)
        if any(s >= 1 for s in self.scales):
            raise ConfigError(f"{where}.scales must lie in [0, 1), got {self.scales!r}")
        _choice(self.zoom_draw, f"{where}.zoom_draw", ZOOM_DRAWS)
        _numbers(self.translation, f"{where}.translation", 3, low=0.0)
        _choice(self.padding_mode, f"{where}.padding_mode", PADDING_MODES)


@dataclass
class GammaConfig(Section):
    """``data.augment.intensity.gamma``: gamma in [exp(-log_gamma), exp(log_gamma)]."""

    log_gamma: float = 0.3

    def check(self, where: str) -> None:
        _non_negative(self.log_gamma, f"{where}.log_gamma")


@dataclass
class BlurConfig(Section):
    """``data.augment.intensity.blur``: Gaussian sigma per axis ~ U(lo, hi) voxels."""

    sigma: List[float] = field(default_factory=lambda: [0.0, 1.0])

    def check(self, where: str) -> None:
        _numbers(self.sigma, f"{where}.sigma", 2, low=0.0)
        if self.sigma[0] > self.sigma[1]:
            raise ConfigError(f"{where}.sigma must be [lo, hi] with lo <= hi, got {self.sigma!r}")


@dataclass
class NoiseConfig(Section):
    """``data.augment.intensity.noise``: Gaussian noise std ~ U(0, std)."""

    std: float = 0.25

    def check(self, where: str) -> None:
        _non_negative(self.std, f"{where}.std")


@dataclass
class IntensityConfig(Section):
    """``data.augment.intensity``: exactly one of gamma / blur / noise (/ identity) per sample."""

    enabled: bool = True
    #: gamma, blur, noise.
    weights: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    #: > 0 adds a "no change" option.
    identity_weight: float = 0.0
    gamma: GammaConfig = _nested(GammaConfig)
    blur: BlurConfig = _nested(BlurConfig)
    noise: NoiseConfig = _nested(NoiseConfig)

    def check(self, where: str) -> None:
        _flag(self.enabled, f"{where}.enabled")
        _numbers(self.weights, f"{where}.weights", 3, low=0.0)
        _non_negative(self.identity_weight, f"{where}.identity_weight")
        if sum(self.weights) + self.identity_weight <= 0:
            raise ConfigError(f"{where}.weights: at least one weight must be > 0, got {self.weights!r}")


@dataclass
class ZNormConfig(Section):
    """``data.augment.znorm``: :class:`dcm.training.global_roi.ZNormPositived`, as at inference."""

    enabled: bool = True
    #: torchio (released): mean / std of the voxels > 0, applied to every voxel; monai: to the voxels > 0.
    mode: str = "torchio"

    def check(self, where: str) -> None:
        _flag(self.enabled, f"{where}.enabled")
        _choice(self.mode, f"{where}.mode", ZNORM_MODES)


@dataclass
class GlobalAugmentConfig(Section):
    """``data.augment`` of the global-RoI trainer (the released torchio recipe, see ``build_augmentation``)."""

    flip: FlipConfig = _nested(FlipConfig)
    elastic: ElasticConfig = _nested(ElasticConfig)
    affine: AffineConfig = _nested(AffineConfig)
    intensity: IntensityConfig = _nested(IntensityConfig)
    znorm: ZNormConfig = _nested(ZNormConfig)


@dataclass
class GlobalDataConfig(Section):
    """``data`` of the global-RoI trainer (:class:`dcm.training.global_roi.GlobalRoICropDataset`)."""

    #: the output folder of train_global_roi/preprocess.py (required when the data are read).
    data_dir: Optional[str] = None
    pattern: str = "*.npz"
    #: an augmented label with <= this many voxels is replaced by another crop.
    min_foreground: int = 0
    #: replacements tried before giving up (corrupt files, empty labels).
    max_retries: int = 10
    augment: GlobalAugmentConfig = _nested(GlobalAugmentConfig)

    def check(self, where: str) -> None:
        _text(self.data_dir, f"{where}.data_dir", none_ok=True)
        _text(self.pattern, f"{where}.pattern")
        _integer(self.min_foreground, f"{where}.min_foreground", 0)
        _integer(self.max_retries, f"{where}.max_retries", 0)
