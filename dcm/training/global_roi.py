"""Training of the global-RoI expert (SAM-Med3D at 64^3): cached-crop dataset, augmentation, interaction loop.

Released recipe (``../shared/spec/dcm.md``, "Global-RoI expert", "Training"): every object's RoI is cropped
offline to 64^3 (``train_global_roi/preprocess.py``); each sample is augmented (flips, elastic, affine, one of
gamma / blur / noise, z-norm over voxels > 0) and trained with a simulated interaction:

* step 0: the RoI centre (the box centre) as a positive click at ``(S/2 - 1,) * 3`` = (31, 31, 31), with an
  all-zero mask prompt;
* then ``num_steps`` (5) correction steps: ``K`` (6) candidate clicks are drawn from the Gaussian-smoothed
  (sigma 1) error map between the current binarised prediction and the ground truth, each candidate is run
  (as one batch of B * K) with all previous clicks plus its own and the previous binarised mask as mask
  prompt; the chain continues with candidate 0.

The image embedding is computed once per batch and shared (``repeat_interleave``) by every step and candidate,
so only the prompt encoder and the mask decoder run again; gradients reach the encoder through it. The whole
loop runs inside the model's ``forward`` (:class:`SamMed3DTrainable`), so that DDP sees a single forward per
backward (gradient synchronisation and ``no_sync`` rely on that).

Config sections read here: ``model`` (``preset``, ``overrides``), ``data`` (``data_dir``, ``pattern``,
``min_foreground``, ``max_retries``, ``augment``), ``interaction`` and the extra ``train`` keys
``lr_encoder``, ``lr_decoder``, ``warmup_steps``, ``milestones``, ``gamma``, ``click_loss_weight``,
``click_loss_radius`` (see ``configs/train_global_roi.yaml``); their schemas (keys, defaults, checks) are
:mod:`dcm.training.config_schema`'s ``Global*Config``, checked when the trainer is constructed.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcm.config import get
from dcm.errors import ConfigError
from dcm.models import SamMed3D, build_sam_med3d, load_model_config
from dcm.prompts import box_center_in_frame
from dcm.training.clicks import ClickLoss
from dcm.training.config_schema import (
    GlobalAugmentConfig,
    GlobalDataConfig,
    GlobalInteractionConfig,
    GlobalTrainConfig,
)
from dcm.training.trainer import EpochAwareDataset, Trainer, sample_seed, warmup_multistep

__all__ = [
    "ZNormPositived",
    "build_augmentation",
    "GlobalRoICropDataset",
    "InteractionConfig",
    "error_region",
    "sample_candidate_clicks",
    "dice_per_sample",
    "run_interaction",
    "SamMed3DTrainable",
    "interaction_figure",
    "GlobalRoITrainer",
]


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


class ZNormPositived:
    """Dictionary transform: :func:`dcm.experts.roi.znorm_positive` on ``keys`` (deterministic, last).

    The inference RoI pipeline's own function, so that training normalises exactly as inference does;
    ``mode='torchio'`` (released): mean / std (ddof 1) of the voxels > 0, applied to every voxel (zero padding
    becomes ``-mean / std``). ``mode='monai'`` changes only the voxels > 0 (``NormalizeIntensity(nonzero=True)``
    for non-negative images).
    """

    def __init__(self, keys: Sequence[str], mode: str = "torchio") -> None:
        from dcm.experts.roi import ZNORM_MODES

        if mode not in ZNORM_MODES:
            raise ConfigError(f"data.augment.znorm.mode: one of {ZNORM_MODES}, got {mode!r}")
        self.keys = tuple(keys)
        self.mode = mode

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        from dcm.experts.roi import znorm_positive

        d = dict(data)
        for key in self.keys:
            d[key] = znorm_positive(torch.as_tensor(d[key]), mode=self.mode)
        return d


def build_augmentation(acfg: Union[Mapping[str, Any], GlobalAugmentConfig], size: int):
    """The released augmentation as a MONAI ``Compose`` over ``{'image', 'label'}`` (1, S, S, S) tensors.

    Axes are (z, y, x) in every per-axis setting. Image resampling is bilinear, label resampling nearest.
    The released pipeline used torchio; the MONAI counterparts and their differences:

    * ``flip``: torchio ``RandomFlip(axes=(0, 1, 2))`` -> one ``RandFlipd`` per axis, each with ``prob``.
    * ``elastic``: torchio ``RandomElasticDeformation(num_control_points=7, max_displacement=7.5)`` ->
      :class:`dcm.training.spatial.RandBSplineElasticd`: the same draw (a cubic B-spline through a grid of
      ``control_points`` control displacements ~ U(-max, max) voxels, ``locked_borders`` outer control
      points per side at zero on ``locked_axes``), with a fold guard (``min_jacobian``, ``shrink``).
    * ``affine``: torchio ``RandomAffine(scales=(0.2, 0.5, 0.5), translation=4, degrees=0)`` ->
      :class:`dcm.training.spatial.RandZoomTranslated`: image zoom per axis ~ U(1 - s, 1 + s)
      (``zoom_draw: scale``; ``inverse``: its reciprocal, as MONAI's ``RandAffine`` draws), shift ~ U(-t, t).
    * ``intensity``: torchio ``OneOf([RandomGamma(log_gamma=0.3), RandomBlur(std=(0, 1)),
      RandomNoise(std=(0, 0.25))])`` -> ``OneOf([RandAdjustContrastd(gamma=(e^-0.3, e^0.3)),
      RandGaussianSmoothd(sigma=(0, 1) per axis), RandGaussianNoised(std=0.25, sample_std=True)])``; MONAI's
      gamma is applied to the min-max-rescaled image (torchio: to the raw values) and drawn uniformly, not
      log-uniformly. ``identity_weight`` > 0 adds a "no intensity change" option.
    * ``znorm``: :class:`ZNormPositived` (mean / std of the voxels > 0, applied to all voxels, as released).

    Args:
        acfg: the ``data.augment`` section, checked (:class:`~dcm.training.config_schema.GlobalAugmentConfig`) or
            a mapping (checked here; missing keys take the schema's released defaults).
        size: the crop side S (64).

    Returns:
        A ``monai.transforms.Compose``; seed it per sample with ``set_random_state(seed=...)``.
    """
    from monai.transforms import (
        Compose,
        Identityd,
        OneOf,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
    )

    from dcm.training.spatial import RandBSplineElasticd, RandZoomTranslated

    a = acfg if isinstance(acfg, GlobalAugmentConfig) else GlobalAugmentConfig.from_mapping(acfg, "data.augment")
    keys = ["image", "label"]
    transforms: List[Any] = []
    flip, elastic, affine, intensity, znorm = a.flip, a.elastic, a.affine, a.intensity, a.znorm
    if flip.enabled:
        for axis in range(3):
            transforms.append(RandFlipd(keys=keys, spatial_axis=axis, prob=float(flip.prob)))
    if elastic.enabled:
        transforms.append(RandBSplineElasticd(
            keys, size, prob=float(elastic.prob), control_points=elastic.control_points,
            locked_borders=elastic.locked_borders, locked_axes=[int(x) for x in elastic.locked_axes],
            max_displacement=float(elastic.max_displacement), padding_mode=elastic.padding_mode,
            min_jacobian=float(elastic.min_jacobian), shrink=float(elastic.shrink)))
    if affine.enabled:
        transforms.append(RandZoomTranslated(
            keys, prob=float(affine.prob), scales=[float(v) for v in affine.scales],
            translation=[float(t) for t in affine.translation], zoom_draw=affine.zoom_draw,
            padding_mode=affine.padding_mode))
    if intensity.enabled:
        log_gamma = float(intensity.gamma.log_gamma)
        sigma = tuple(float(s) for s in intensity.blur.sigma)
        options: List[Any] = [
            RandAdjustContrastd(keys="image", prob=1.0, gamma=(math.exp(-log_gamma), math.exp(log_gamma))),
            RandGaussianSmoothd(keys="image", prob=1.0, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
            RandGaussianNoised(keys="image", prob=1.0, mean=0.0, std=float(intensity.noise.std)),
        ]
        weights = [float(w) for w in intensity.weights]
        identity = float(intensity.identity_weight)
        if identity > 0:
            options.append(Identityd(keys="image"))
            weights.append(identity)
        transforms.append(OneOf(options, weights=weights))
    if znorm.enabled:
        transforms.append(ZNormPositived(keys=["image"], mode=znorm.mode))
    return Compose(transforms)


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------

_CORRUPT_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


class GlobalRoICropDataset(EpochAwareDataset):
    """The cached per-object crops of ``train_global_roi/preprocess.py`` (``<case>_obj<label:03d>.npz``).

    Each file holds ``image`` float32 (S, S, S) resized raw intensities (not normalised), ``label`` uint8
    (S, S, S) binary, plus ``spacing_zyx``, ``roi_center``, ``roi_size`` (unused here). Axes (z, y, x).

    An item is ``{'image': (1, S, S, S) float32 z-normalised, 'label': (1, S, S, S) float32 {0, 1}}``. Its
    augmentation is seeded from ``rng_for(index)``, so it depends on (seed, epoch, index) only. A file that
    cannot be read, has the wrong shape or non-finite values is skipped with a ``RuntimeWarning``, as is a
    sample whose augmented label has ``<= min_foreground`` voxels: the item is then drawn from another index
    chosen by the same generator (deterministic), up to ``max_retries`` times.
    """

    def __init__(self, data_dir: Union[str, Path], size: int = 64,
                 augment: Union[None, Mapping[str, Any], GlobalAugmentConfig] = None,
                 seed: int = 0, pattern: str = "*.npz", min_foreground: int = 0, max_retries: int = 10) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise ConfigError(f"data.data_dir: {self.data_dir} is not a folder (run train_global_roi/preprocess.py)")
        self.files: List[Path] = sorted(self.data_dir.glob(pattern))
        if not self.files:
            raise ConfigError(f"data.data_dir: no {pattern} crops in {self.data_dir}")
        self.size = int(size)
        self.seed = int(seed)
        self.min_foreground = int(min_foreground)
        self.max_retries = int(max_retries)
        self.transform = build_augmentation(augment, self.size) if augment else None

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def _skip(path: Path, why: str) -> None:
        # Python's default warning filter shows each distinct message (i.e. each file) once per process.
        warnings.warn(f"skipping crop {path}: {why}", RuntimeWarning, stacklevel=3)

    def read(self, index: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """The raw ``(image, label)`` arrays (S, S, S) of file ``index``, or None (with a warning) if unusable."""
        path = self.files[index]
        try:
            with np.load(path, allow_pickle=False) as z:
                image = np.asarray(z["image"], dtype=np.float32)
                label = np.asarray(z["label"])
        except _CORRUPT_ERRORS as e:
            self._skip(path, f"unreadable ({type(e).__name__}: {e})")
            return None
        expected = (self.size,) * 3
        if image.shape != expected or label.shape != expected:
            self._skip(path, f"shapes {image.shape} / {label.shape}, expected {expected}")
            return None
        if not np.isfinite(image).all():
            self._skip(path, "non-finite image values")
            return None
        return image, (label > 0).astype(np.float32)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        rng = self.rng_for(index)
        current = int(index)
        for _ in range(self.max_retries + 1):
            arrays = self.read(current)
            if arrays is not None:
                item = {"image": torch.from_numpy(arrays[0])[None], "label": torch.from_numpy(arrays[1])[None]}
                seed = int(rng.integers(0, 2**32 - 1))
                if self.transform is not None:
                    self.transform.set_random_state(seed=seed)
                    item = self.transform(item)
                item = {k: torch.as_tensor(v).as_subclass(torch.Tensor).float().contiguous() for k, v in item.items()
                        if k in ("image", "label")}
                if float(item["label"].sum()) > self.min_foreground:
                    return item
                self._skip(self.files[current], f"<= {self.min_foreground} foreground voxels after augmentation")
            current = int(rng.integers(0, len(self.files)))
        raise RuntimeError(f"no usable crop after {self.max_retries + 1} tries from index {index} in {self.data_dir}")

    @staticmethod
    def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Stack items: ``{'image': (B, 1, S, S, S), 'label': (B, 1, S, S, S)}``."""
        return {key: torch.stack([item[key] for item in batch]) for key in ("image", "label")}


# --------------------------------------------------------------------------------------------------
# Interaction loop
# --------------------------------------------------------------------------------------------------


#: The ``interaction`` section's schema (kept under its former name).
InteractionConfig = GlobalInteractionConfig


@torch.no_grad()
def error_region(pred: torch.Tensor, gt: torch.Tensor, sigma: float = 1.0, truncated: float = 5.0,
                 top_n: int = 64, min_threshold: float = 0.3) -> torch.Tensor:
    """Where the next click is drawn: the smoothed error map >= max(its ``top_n``-th largest value, ``min_threshold``).

    Args:
        pred, gt: (B, 1, S, S, S) binary (bool or {0, 1}); axes (z, y, x).
        sigma, truncated: the Gaussian (MONAI ``GaussianFilter``, kernel radius ``truncated * sigma``).

    Returns:
        (B, 1, S, S, S) bool; a sample's region is empty when its smoothed error never reaches the floor
        (no error, or only a few scattered voxels).
    """
    from monai.networks.layers import GaussianFilter

    err = (pred.bool() != gt.bool()).float()
    with torch.autocast(device_type=err.device.type, enabled=False):
        smooth = GaussianFilter(spatial_dims=3, sigma=sigma, truncated=truncated).to(err.device)(err)
    flat = smooth.flatten(1)
    kth = flat.topk(min(int(top_n), flat.shape[1]), dim=1).values[:, -1]
    threshold = kth.clamp(min=float(min_threshold))
    return smooth >= threshold.view(-1, 1, 1, 1, 1)


@torch.no_grad()
def sample_candidate_clicks(region: torch.Tensor, gt: torch.Tensor, k: int, generator: torch.Generator
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``k`` clicks per sample uniformly from ``region``; label each by the ground truth there.

    Without replacement when the region has more than ``k`` voxels, with replacement otherwise. An empty
    region (the prediction is right, or its errors are too scattered to pass the threshold) falls back to
    the whole volume, foreground and background alike (each click still labelled by the ground truth);
    the released code clicked the centre voxel (S/2 - 1, ...) K times instead.

    Args:
        region, gt: (B, 1, S, S, S) bool / binary.
        generator: CPU generator (all randomness of the step).

    Returns:
        points (B, k, 3) long voxel (z, y, x), labels (B, k) long (1 fg, 0 bg), fallback (B,) bool.
    """
    b, _, d, h, w = region.shape
    points, labels, fallback = [], [], []
    for i in range(b):
        flat = region[i, 0].reshape(-1).nonzero().squeeze(1)
        empty = flat.numel() == 0
        n = d * h * w if empty else flat.numel()
        if n > k:
            choice = torch.randperm(n, generator=generator)[:k]
        else:
            choice = torch.randint(0, n, (k,), generator=generator)
        choice = choice.to(region.device)
        sel = choice if empty else flat[choice]
        points.append(torch.stack([sel // (h * w), (sel // w) % h, sel % w], dim=1))
        labels.append(gt[i, 0].reshape(-1)[sel].long())
        fallback.append(empty)
    return torch.stack(points), torch.stack(labels), torch.tensor(fallback, device=region.device)


def dice_per_sample(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks (B, 1, ...) per sample -> (B,): :func:`dcm.metrics.dice` batched in torch, with the
    trainers' empty-mask convention (:data:`dcm.metrics.DICE_BOTH_EMPTY_TRAINING`: 1 where both are empty)."""
    p, g = pred.bool().flatten(1), gt.bool().flatten(1)
    inter = (p & g).sum(1).float()
    total = (p.sum(1) + g.sum(1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def _decode(sam: SamMed3D, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
            mask_prompt: torch.Tensor, size: int) -> torch.Tensor:
    """Prompt encoder + mask decoder -> float32 logits (N, 1, S, S, S) (trilinear from (N, 1, 4g, 4g, 4g))."""
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
    low, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False)
    return F.interpolate(low.float(), size=(size,) * 3, mode="trilinear", align_corners=False)


def run_interaction(sam: SamMed3D, image: torch.Tensor, gt: torch.Tensor, generator: torch.Generator,
                    config: InteractionConfig, loss_fn: nn.Module,
                    click_loss: Optional[ClickLoss] = None) -> Dict[str, Any]:
    """The released training interaction on one batch.

    Args:
        sam: the model (its three parts are called directly).
        image: (B, 1, S, S, S) z-normalised crops; gt: (B, 1, S, S, S) binary; axes (z, y, x).
        generator: CPU generator for the click sampling.
        config: loop settings; loss_fn: ``DiceCELoss(sigmoid=True, squared_pred=True)``.
        click_loss: optional :class:`dcm.training.clicks.ClickLoss`, added to each correction step's loss on
            its candidates' correction clicks (not the centre click, which the ground truth may contradict).

    Returns:
        ``loss`` (scalar, with graph), ``dice`` and ``dice_step0`` (detached means over the batch: the final
        chain prediction / the centre-click prediction vs gt) and ``record``: ``points`` (B, n, 3) and
        ``labels`` (B, n) of the final click chain (n = num_steps + 1), ``final_pred`` (B, 1, S, S, S) bool,
        ``steps``: per correction step ``candidates`` (B, K, 3), ``candidate_labels`` (B, K), ``fallback``
        (B,), and with ``record_masks`` also ``region``, ``prev_pred`` (B, 1, S, S, S) and
        ``candidate_preds`` (B * K, 1, S, S, S), ordered sample by sample (b0k0, b0k1, ..., b1k0, ...).
    """
    b, size, k = image.shape[0], image.shape[-1], int(config.num_candidates)
    gt_bool = gt > 0.5
    target = gt_bool.to(torch.float32)
    mask_side = sam.prompt_encoder.mask_input_size[0]
    stride = size // mask_side

    embedding = sam.image_encoder(image)
    # The box-centre click: the crop is the RoI around the box centre (dcm.prompts.box_center_in_frame).
    center = [float(c) for c in box_center_in_frame(size)]
    coords = torch.tensor([[center]], device=image.device).repeat(b, 1, 1)
    labels = torch.ones((b, 1), dtype=torch.long, device=image.device)
    mask_prompt = torch.zeros((b, 1) + tuple(sam.prompt_encoder.mask_input_size), device=image.device)
    logits = _decode(sam, embedding, coords, labels, mask_prompt, size)
    loss = loss_fn(logits, target)
    pred = logits.detach() > 0  # sigmoid > 0.5
    dice_step0 = dice_per_sample(pred, gt_bool).mean()
    steps: List[Dict[str, torch.Tensor]] = []
    for _ in range(int(config.num_steps)):
        region = error_region(pred, gt_bool, config.error_sigma, config.error_truncated, config.top_n,
                              config.min_threshold)
        new_points, new_labels, fallback = sample_candidate_clicks(region, gt_bool, k, generator)
        cand_coords = torch.cat([coords.repeat_interleave(k, 0), new_points.reshape(b * k, 1, 3).to(coords.dtype)], 1)
        cand_labels = torch.cat([labels.repeat_interleave(k, 0), new_labels.reshape(b * k, 1)], 1)
        cand_masks = pred[:, :, ::stride, ::stride, ::stride].float().repeat_interleave(k, 0)
        cand_logits = _decode(sam, embedding.repeat_interleave(k, 0), cand_coords, cand_labels, cand_masks, size)
        step_loss = loss_fn(cand_logits, target.repeat_interleave(k, 0))
        if click_loss is not None and click_loss.weight > 0:
            enforced = cand_labels.clone()
            enforced[:, 0] = -1  # the centre click is a convention, not the ground truth's answer
            step_loss = step_loss + click_loss(cand_logits, cand_coords, enforced)
        loss = loss + config.step_weight * step_loss
        cand_pred = cand_logits.detach() > 0
        step: Dict[str, torch.Tensor] = {"candidates": new_points, "candidate_labels": new_labels,
                                         "fallback": fallback}
        if config.record_masks:
            step.update(region=region, prev_pred=pred, candidate_preds=cand_pred)
        steps.append(step)
        pred, coords, labels = cand_pred[0::k], cand_coords[0::k], cand_labels[0::k]
    loss = loss / (int(config.num_steps) + 1)
    record = {"points": coords.detach().long(), "labels": labels.detach(), "final_pred": pred, "steps": steps}
    return {"loss": loss, "dice": dice_per_sample(pred, gt_bool).mean(), "dice_step0": dice_step0,
            "record": record}


class SamMed3DTrainable(SamMed3D):
    """:class:`SamMed3D` whose ``forward`` can also run the training interaction (same state-dict keys).

    ``model(image, interaction={...})`` calls :func:`run_interaction` (keyword arguments ``gt``,
    ``generator``, ``config``, ``loss_fn``, ``click_loss``); without ``interaction`` it is :meth:`SamMed3D.forward`.
    """

    @classmethod
    def from_sam(cls, sam: SamMed3D) -> "SamMed3DTrainable":
        return cls(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, config=sam.config)

    def forward(self, image: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                boxes: Optional[torch.Tensor] = None, masks: Optional[torch.Tensor] = None,
                multimask_output: bool = False, *, interaction: Optional[Dict[str, Any]] = None) -> Any:
        if interaction is None:
            return super().forward(image, points=points, boxes=boxes, masks=masks, multimask_output=multimask_output)
        return run_interaction(self, image, **interaction)


# --------------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------------


def interaction_figure(image: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, points: torch.Tensor,
                       labels: torch.Tensor, z: Optional[int] = None, band: int = 2):
    """A matplotlib figure of one axial slice: image, ground truth, prediction with the clicks on that slice.

    Args:
        image, gt, pred: (S, S, S) (z, y, x); points (n, 3) voxel (z, y, x), labels (n,); z: the slice
            (default S/2 - 1, the slice of the centre click); clicks within ``band`` slices of it are drawn
            (faded when off the slice), numbered in click order; green positive, red negative.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = image.shape[0]
    z = box_center_in_frame(size)[0] if z is None else int(z)
    img = image[z].float().cpu().numpy()
    fig = Figure(figsize=(9, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, title, overlay in zip(axes, ("image", "ground truth", "prediction + clicks"),
                                  (None, gt[z].float().cpu().numpy(), pred[z].float().cpu().numpy())):
        ax.imshow(img, cmap="gray")
        if overlay is not None:
            ax.imshow(np.ma.masked_where(overlay < 0.5, overlay), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(f"{title} (z={z})", fontsize=9)
        ax.axis("off")
    pts, lbs = points.cpu().round().long(), labels.cpu()
    for order, (p, lab) in enumerate(zip(pts.tolist(), lbs.tolist())):
        if abs(p[0] - z) > band:
            continue
        colour = "lime" if lab == 1 else "red"
        axes[2].scatter([p[2]], [p[1]], c=colour, marker="o" if lab == 1 else "x", s=30,
                        alpha=1.0 if p[0] == z else 0.45)
        axes[2].annotate(str(order), (p[2], p[1]), color=colour, fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


class GlobalRoITrainer(Trainer):
    """The global-RoI expert's trainer (see the module docstring and ``configs/train_global_roi.yaml``)."""

    train_schema = GlobalTrainConfig

    def __init__(self, cfg: Dict[str, Any]) -> None:
        super().__init__(cfg)
        #: the checked ``interaction`` and ``data`` sections (``train``: :attr:`train`).
        self.interaction = GlobalInteractionConfig.from_mapping(cfg.get("interaction"), "interaction")
        self.data = GlobalDataConfig.from_mapping(cfg.get("data"), "data")
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean",
                                  lambda_dice=self.interaction.lambda_dice, lambda_ce=self.interaction.lambda_ce)
        self.click_loss = ClickLoss.from_cfg(self.train)
        #: the last training step's click chain and per-step candidates (see :func:`run_interaction`).
        self.last_clicks: Optional[Dict[str, Any]] = None
        self._last_image: Optional[torch.Tensor] = None

    def model_config(self) -> Dict[str, Any]:
        """The model preset (``model.preset``) with ``model.overrides`` applied."""
        preset = get(self.cfg, "model.preset")
        if not preset:
            raise ConfigError("model.preset: missing (e.g. sam_med3d_64)")
        mcfg = dict(load_model_config(preset))
        mcfg.update(get(self.cfg, "model.overrides") or {})
        return mcfg

    def build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, 1))
            sam = build_sam_med3d(self.model_config())
        return SamMed3DTrainable.from_sam(sam)

    def build_dataset(self) -> GlobalRoICropDataset:
        data = self.data
        if not data.data_dir:
            raise ConfigError("data.data_dir: missing (the output folder of train_global_roi/preprocess.py)")
        return GlobalRoICropDataset(data.data_dir, size=int(self.model_config()["img_size"]),
                                    augment=data.augment, seed=self.seed, pattern=data.pattern,
                                    min_foreground=data.min_foreground, max_retries=data.max_retries)

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Two groups: the image encoder at ``train.lr_encoder``, prompt encoder + mask decoder at
        ``train.lr_decoder``."""
        encoder = [p for p in model.image_encoder.parameters() if p.requires_grad]
        decoder = [p for part in (model.prompt_encoder, model.mask_decoder) for p in part.parameters()
                   if p.requires_grad]
        return [{"params": encoder, "lr": float(self.train.lr_encoder), "name": "image_encoder"},
                {"params": decoder, "lr": float(self.train.lr_decoder), "name": "prompt_encoder+mask_decoder"}]

    def build_scheduler(self, optimizer, steps_per_epoch: int):
        """Linear warm-up over ``train.warmup_steps`` optimizer steps, ×``gamma`` at each epoch in ``milestones``."""
        return warmup_multistep(optimizer, self.train.warmup_steps, self.train.milestones,
                                float(self.train.gamma), steps_per_epoch)

    def training_step(self, model: nn.Module, batch: Mapping[str, torch.Tensor],
                      generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Run the interaction loop on ``batch`` (``image``, ``label``: (B, 1, S, S, S)) through ``model``.

        ``model`` may be DDP-wrapped: the loop runs inside its forward. Returns ``loss``, ``dice``,
        ``dice_step0``; the click chain is kept on ``self.last_clicks``.
        """
        device = self.dist.device
        image = batch["image"].to(device, non_blocking=True)
        gt = batch["label"].to(device, non_blocking=True)
        out = model(image, interaction={"gt": gt, "generator": generator, "config": self.interaction,
                                        "loss_fn": self.loss_fn, "click_loss": self.click_loss})
        self.last_clicks = out["record"]
        self._last_image = batch["image"]
        return {"loss": out["loss"], "dice": out["dice"].detach(), "dice_step0": out["dice_step0"].detach()}

    def log_figure(self, model: nn.Module, batch: Mapping[str, torch.Tensor], epoch: int) -> None:
        """Middle axial slice of the batch's first sample: image, gt, final prediction and clicks."""
        if self.writer is None:
            return
        record = self.last_clicks
        if record is None or self._last_image is not batch["image"]:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 2))
                record = run_interaction(model, batch["image"].to(self.dist.device),
                                         batch["label"].to(self.dist.device), generator, self.interaction,
                                         self.loss_fn)["record"]
            model.train(was_training)
        fig = interaction_figure(batch["image"][0, 0], batch["label"][0, 0], record["final_pred"][0, 0],
                                 record["points"][0], record["labels"][0])
        self.writer.add_figure("train/interaction", fig, global_step=epoch)
