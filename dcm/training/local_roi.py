"""Training of the local-RoI expert (MONAI VISTA3D, point head only) on challenge ``.npz`` cases.

The released recipe (see the spec, "Local-RoI expert"), with its click simulation fixed:

* data: every ``.npz`` training case (``imgs``, ``gts``, ``spacing``) of a folder; the whole volume is
  normalised with its 1st..99th percentiles to [0, 1] (clipped; the same helpers as the expert at
  inference), zero-padded to the patch size, and a patch is cropped around a voxel of a randomly drawn
  class, background included (``RandCropByLabelClassesd``), then intensity scale / shift, Gaussian noise,
  flips and rot90 (released: each with probability 0.2, scale / shift 0.2, noise std 0.2, rot90 in (z, y));
* per patch, up to ``max_prompt`` objects present in it are prompted. The first click is the protocol's
  (``next_click(gt, zeros)``: the object's innermost voxel) or a random object voxel; then ``num_clicks``
  corrective clicks, each computed with :func:`dcm.protocol.next_click` from the *current* prediction
  (sigmoid > 0.5, detached). Every step gives the point head all clicks so far (1 fg / 0 bg) and adds a
  DiceCE loss (sigmoid, squared_pred). The released loop never updated its prediction, so its 5 clicks
  were one point;
* the encoder runs once per optimizer step; only the point head reruns per click (the gradient of every
  step still flows into the encoder, which is trained). ``train.steps_per_patch`` cuts a patch's click
  steps into that many optimizer steps (released: one per click, 5);
* optionally a loss on each click's neighbourhood (``train.click_loss_weight``, :mod:`dcm.training.clicks`).

Everything the interaction does happens inside :class:`InteractiveVISTA3D.forward`, so that DDP sees one
forward per step. Its state dict has exactly VISTA3D's keys: checkpoints load into
:class:`dcm.experts.local_roi.LocalRoIExpert` and ``build_vista3d`` strictly.

Config sections read here (besides the trainer's ``train``): ``model`` (preset name, YAML path or dict),
``data`` and ``interaction``; see ``configs/train_local_roi.yaml``.
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from dcm.errors import CaseError, CheckpointError, ConfigError
from dcm.experts.local_roi import LocalRoIExpert, intensity_percentiles, scale_intensity
from dcm.prompts import ZYX, Click
from dcm.metrics import DICE_BOTH_EMPTY_TRAINING, dice
from dcm.protocol import next_click
from dcm.training.clicks import ClickLoss, ClickT, click_tensors, click_to_t
from dcm.training.config_schema import LocalDataConfig, LocalInteractionConfig, LocalTrainConfig
from dcm.training.trainer import EpochAwareDataset, Trainer, sample_seed, warmup_cosine

__all__ = [
    "LABEL_BRANCH_PREFIXES",
    "SkippedCaseWarning",
    "ScalePercentilesd",
    "build_transforms",
    "npz_header_problem",
    "LocalRoIDataset",
    "split_steps",
    "InteractiveVISTA3D",
    "LocalRoITrainer",
]

#: Parameters that point-only training never uses: the class head, the encoder's label ("auto") decoder
#: branch and the point-head tensors that only class prompts / mask prompts would reach. Frozen with
#: ``train.freeze_class_head`` so that DDP needs no ``find_unused_parameters``.
LABEL_BRANCH_PREFIXES = (
    "class_head.",
    "image_encoder.up_layers_auto.",
    "point_head.class_embeddings.",
    "point_head.zeroshot_embed.",
    "point_head.mask_downsample.",
)

class SkippedCaseWarning(UserWarning):
    """A training case could not be read or is unusable; it is skipped."""


# ------------------------------------------------------------------------------------------------ data


def npz_header_problem(path: Union[str, Path]) -> Optional[str]:
    """Cheap check of a training ``.npz``: readable zip with 3D ``imgs`` and same-shape ``gts`` (headers only).

    Returns:
        A one-line problem, or None when the headers look right (the data itself is read later).
    """
    headers: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in ("imgs", "gts"):
                if f"{key}.npy" not in names:
                    return f"no '{key}' array"
                with zf.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    fmt = np.lib.format
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(f)
                headers[key] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, KeyError) as e:
        return f"not a readable .npz file ({type(e).__name__}: {e})"
    (img_shape, img_dtype), (gt_shape, gt_dtype) = headers["imgs"], headers["gts"]
    if len(img_shape) != 3:
        return f"imgs must be (z, y, x), got shape {img_shape}"
    if gt_shape != img_shape:
        return f"gts shape {gt_shape} differs from imgs {img_shape}"
    if img_dtype.kind not in "biuf" or gt_dtype.kind not in "biu":
        return f"unsupported dtypes imgs {img_dtype} / gts {gt_dtype}"
    return None


def _read_case(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(imgs, gts)`` of a training case, both (z, y, x); CaseError when unreadable or unusable."""
    from dcm.data.cases import load_npz

    arrays = load_npz(path)
    for key in ("imgs", "gts"):
        if key not in arrays:
            raise CaseError(path, key, "missing")
    imgs, gts = np.asarray(arrays["imgs"]), np.asarray(arrays["gts"])
    if imgs.ndim != 3 or imgs.dtype.kind not in "biuf":
        raise CaseError(path, "imgs", f"must be a numeric (z, y, x) array, got {imgs.dtype} {imgs.shape}")
    if gts.shape != imgs.shape or gts.dtype.kind not in "biu":
        raise CaseError(path, "gts", f"must be an integer array of the image's shape, got {gts.dtype} {gts.shape}")
    if gts.min() < 0 or gts.max() > 255:
        raise CaseError(path, "gts", "labels must be 0..255")
    if not gts.any():
        raise CaseError(path, "gts", "no labelled object")
    return imgs, gts.astype(np.uint8, copy=False)


class ScalePercentilesd(MapTransform):
    """Percentile normalisation of whole (C, z, y, x) volumes, exactly as the local expert at inference.

    The ``lower`` / ``upper`` percentiles of each volume map to 0 / 1, clipped
    (:func:`dcm.experts.local_roi.scale_intensity`). Output float32 numpy.
    """

    def __init__(self, keys: Union[str, Sequence[str]], lower: float = 1.0, upper: float = 99.0):
        super().__init__(keys)
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, data: Mapping[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = np.asarray(d[key])
            lo, hi = intensity_percentiles(volume, self.lower, self.upper)
            d[key] = scale_intensity(volume, lo, hi)
        return d


def build_transforms(patch_size: ZYX, num_classes: int, data_cfg: Union[Mapping[str, Any], LocalDataConfig]):
    """The MONAI dictionary pipeline for one case with labels ``0..num_classes - 1``.

    Input ``{"image": (1, z, y, x) raw intensities, "label": (1, z, y, x) uint8}``; output (a list of one
    dict, from the crop) with both cropped to ``patch_size``. Spatial axes 0, 1, 2 are z, y, x.
    """
    from monai.transforms import (
        Compose,
        RandCropByLabelClassesd,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    data = data_cfg if isinstance(data_cfg, LocalDataConfig) else LocalDataConfig.from_mapping(data_cfg, "data")
    aug = data.augment
    lower, upper = data.percentiles
    keys = ["image", "label"]
    bg = float(data.crop_background_ratio)
    transforms: List[Any] = [
        ScalePercentilesd("image", lower, upper),
        # After normalisation, so the padding is 0 as in the expert's padded windows.
        SpatialPadd(keys, spatial_size=patch_size, mode="constant"),
        # Classes absent from a case get ratio 0 (warn=False: not worth a warning per sample).
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=patch_size, num_classes=num_classes,
                                ratios=[bg] + [1.0] * (num_classes - 1), num_samples=1, warn=False),
    ]
    s, o, n = aug.scale_intensity, aug.shift_intensity, aug.gaussian_noise
    if float(s.prob) > 0:
        transforms.append(RandScaleIntensityd("image", factors=s.factors, prob=float(s.prob)))
    if float(o.prob) > 0:
        transforms.append(RandShiftIntensityd("image", offsets=o.offsets, prob=float(o.prob)))
    if float(n.prob) > 0:
        transforms.append(RandGaussianNoised("image", prob=float(n.prob), mean=float(n.mean), std=float(n.std)))
    if float(aug.flip_prob) > 0:
        transforms += [RandFlipd(keys, prob=float(aug.flip_prob), spatial_axis=axis) for axis in range(3)]
    rot = aug.rot90
    if float(rot.prob) > 0:
        for plane in rot.planes:
            a, b = plane
            if patch_size[a] != patch_size[b]:
                raise ConfigError(f"data.augment.rot90: plane {plane} needs equal patch sizes, got {patch_size}")
            transforms.append(RandRotate90d(keys, prob=float(rot.prob), max_k=rot.max_k, spatial_axes=(a, b)))
    return Compose(transforms)


def _plain(x: Any) -> torch.Tensor:
    """A contiguous plain tensor (MONAI returns MetaTensors)."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))
    return t.contiguous().clone()


class LocalRoIDataset(EpochAwareDataset):
    """Augmented patches of a folder of challenge ``.npz`` training cases.

    Item ``index`` is case ``index % n_cases`` (``repeats`` passes over the cases per epoch); its
    augmentation is a function of ``(seed, epoch, index)`` only. Unusable files are skipped with a
    :class:`SkippedCaseWarning`: at construction (``validate``: ``header`` reads the zip directory and the
    array headers, ``full`` reads every case, ``none`` nothing) and when a read fails later, in which case
    the next readable case (in file order) stands in, with the same random draws.

    Items: ``{"image": (1, pz, py, px) float32, "label": (1, pz, py, px) uint8, "name": str, "index": int}``.
    """

    def __init__(self, data_cfg: Mapping[str, Any], seed: int = 0):
        cfg = data_cfg if isinstance(data_cfg, LocalDataConfig) else LocalDataConfig.from_mapping(data_cfg, "data")
        self.cfg = cfg
        self.seed = int(seed)
        self.patch_size = cfg.patch_zyx
        self.repeats = cfg.repeats
        if cfg.data_dir is None:
            raise ConfigError("data.data_dir is not set (a folder of challenge training .npz cases)")
        data_dir = Path(cfg.data_dir)
        if not data_dir.is_dir():
            raise ConfigError(f"data.data_dir {data_dir}: no such folder (synthetic data: "
                              f"python -m dcm.data.synthetic --out {data_dir})")
        validate = cfg.validate
        self.paths: List[Path] = []
        for path in sorted(data_dir.glob(cfg.pattern)):
            problem = None
            if validate == "header":
                problem = npz_header_problem(path)
            elif validate == "full":
                try:
                    _read_case(path)
                except CaseError as e:
                    problem = e.problem
            if problem is None:
                self.paths.append(path)
            else:
                warnings.warn(f"{path}: skipped ({problem})", SkippedCaseWarning, stacklevel=2)
        if not self.paths:
            raise ConfigError(f"data.data_dir {data_dir}: no usable case matching {cfg.pattern!r}")
        self._bad: Set[Path] = set()
        self._composes: Dict[int, Any] = {}
        self._compose(2)  # a bad augmentation config fails here, not at the first sample

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def _compose(self, num_classes: int):
        if num_classes not in self._composes:
            self._composes[num_classes] = build_transforms(self.patch_size, num_classes, self.cfg)
        return self._composes[num_classes]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rng = self.rng_for(index)
        transform_seed = int(rng.integers(2**31))
        n = len(self.paths)
        for k in range(n):
            path = self.paths[(index + k) % n]
            if path in self._bad:
                continue
            try:
                imgs, gts = _read_case(path)
            except CaseError as e:
                self._bad.add(path)
                warnings.warn(f"{path}: skipped ({e.problem}); using the next case instead", SkippedCaseWarning)
                continue
            compose = self._compose(int(gts.max()) + 1)
            compose.set_random_state(seed=transform_seed)
            out = compose({"image": imgs[None], "label": gts[None]})
            out = out[0] if isinstance(out, (list, tuple)) else out
            return {"image": _plain(out["image"]).float(), "label": _plain(out["label"]).to(torch.uint8),
                    "name": path.stem, "index": int(index)}
        raise RuntimeError(f"no readable training case left among {n} files")


# ----------------------------------------------------------------------------------------------- model


def split_steps(num_steps: int, parts: int) -> List[Tuple[int, int]]:
    """``num_steps`` click steps cut into ``parts`` consecutive ``(start, stop)`` ranges, the longer first.

    E.g. 6 steps in 5 parts: (0, 2), (2, 3), (3, 4), (4, 5), (5, 6).
    """
    if not 1 <= parts <= num_steps:
        raise ConfigError(f"train.steps_per_patch must be in [1, 1 + interaction.num_clicks = {num_steps}], "
                          f"got {parts}")
    size, extra = divmod(num_steps, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + size + (p < extra))
    return list(zip(bounds[:-1], bounds[1:]))


class InteractiveVISTA3D(nn.Module):
    """VISTA3D's modules (same state-dict keys as ``VISTA3D``) with a forward that runs a click simulation.

    Args:
        vista: a MONAI ``VISTA3D`` (``dcm.models.vista3d.build_vista3d``); its modules are shared, not copied.
        num_clicks: corrective clicks after the first (click steps per patch: ``1 + num_clicks``).
        step_loss: ``mean`` or ``sum`` of the per-step losses.
        lambda_dice, lambda_ce: weights of MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)``.
        click_loss: optional :class:`dcm.training.clicks.ClickLoss` added to every step's loss, on all the
            clicks that step was given (padding clicks excluded).

    Attributes:
        record: when True, :attr:`last_interaction` also keeps each step's binary prediction.
        last_interaction: per patch of the last forward, ``{"clicks": per object [((z, y, x), label), ...],
            "dice": per object Dice of the latest step}``, and when ``record``: ``"preds"`` per step (K, z, y, x)
            bool and ``"gts"`` (K, z, y, x) bool.
    """

    def __init__(self, vista: nn.Module, num_clicks: int = 5, step_loss: str = "mean", lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0, click_loss: Optional[ClickLoss] = None):
        super().__init__()
        from monai.losses import DiceCELoss

        self.image_encoder = vista.image_encoder
        self.class_head = vista.class_head
        self.point_head = vista.point_head
        if step_loss not in ("mean", "sum"):
            raise ConfigError(f"interaction.step_loss must be mean or sum, got {step_loss!r}")
        if int(num_clicks) < 0:
            raise ConfigError(f"interaction.num_clicks must be >= 0, got {num_clicks}")
        self.num_clicks = int(num_clicks)
        self.step_loss = step_loss
        self.loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, lambda_dice=float(lambda_dice),
                                  lambda_ce=float(lambda_ce))
        self.click_loss = click_loss or ClickLoss()
        self.record = False
        self.last_interaction: List[Dict[str, Any]] = []
        self._first_dice = 0.0

    def forward(self, images: torch.Tensor, targets: Sequence[torch.Tensor],
                first_clicks: Optional[Sequence[Sequence[ClickT]]] = None,
                steps: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Simulate the interaction on a batch of patches, or the click steps ``steps = (start, stop)`` of it.

        Step 0 starts a new interaction from ``first_clicks``; a later ``start`` continues the one of the
        previous call (its clicks, the next click computed from that call's last prediction), so that an
        interaction can be trained in parts with an optimizer step between them (``train.steps_per_patch``).
        The encoder runs once per call.

        Args:
            images: (B, 1, Z, Y, X) normalised patches.
            targets: per patch, (K_b, 1, Z, Y, X) float {0, 1} masks of its K_b >= 1 prompted objects.
            first_clicks: per patch, K_b first clicks ``((z, y, x), label)`` (needed when ``start`` is 0).
            steps: the click steps to run, default all ``(0, 1 + num_clicks)``.

        Returns:
            ``(loss, dice, dice_first)``: the loss (mean over patches of the step-reduced loss over these
            steps), and the mean Dice over all objects of the last step run and of step 0's prediction
            (both detached).
        """
        start, stop = steps if steps is not None else (0, self.num_clicks + 1)
        if not 0 <= start < stop <= self.num_clicks + 1:
            raise ValueError(f"steps {steps} outside [0, {self.num_clicks + 1}]")
        if start == 0:
            if first_clicks is None:
                raise ValueError("first_clicks are needed to start an interaction")
            self.last_interaction = [{"clicks": [[c] for c in first_clicks[b]], "dice": [],
                                      "gts": target[:, 0].detach().cpu().numpy() > 0.5, "preds": []}
                                     for b, target in enumerate(targets)]
        elif len(self.last_interaction) != len(targets):
            raise ValueError("steps continue an interaction that was not started (call with start 0 first)")
        embeddings, _ = self.image_encoder(images, with_point=True, with_label=False)  # (B, C, Z, Y, X)
        patch_losses: List[torch.Tensor] = []
        dices: List[float] = []
        first_dices: List[float] = []
        for b, target in enumerate(targets):
            record = self.last_interaction[b]
            gt, clicks = record["gts"], record["clicks"]
            step_losses: List[torch.Tensor] = []
            for step in range(start, stop):
                coords, labels = click_tensors(clicks, images.device)
                logits = self.point_head(embeddings[b:b + 1], coords, labels, class_vector=None)  # (K, 1, Z, Y, X)
                term = self.loss_fn(logits.float(), target.float())
                extra = self.click_loss(logits, coords, labels)
                step_losses.append(term if extra is None else term + extra)
                pred = (torch.sigmoid(logits.detach().float()) > 0.5)[:, 0].cpu().numpy()
                if step == 0:
                    record["dice_first"] = [dice(g, p, DICE_BOTH_EMPTY_TRAINING) for p, g in zip(pred, gt)]
                if self.record:
                    record["preds"].append(pred)
                if step == self.num_clicks:
                    break
                for k in range(len(clicks)):
                    # A perfect object (no click) gets a padding point ("not a point") so all K keep N clicks.
                    clicks[k].append(click_to_t(next_click(gt[k], pred[k])))
            stacked = torch.stack(step_losses)
            patch_losses.append(stacked.mean() if self.step_loss == "mean" else stacked.sum())
            record["dice"] = [dice(g, p, DICE_BOTH_EMPTY_TRAINING) for p, g in zip(pred, gt)]
            dices += record["dice"]
            first_dices += record["dice_first"]
        loss = torch.stack(patch_losses).mean()
        device = loss.device
        return (loss, torch.tensor(float(np.mean(dices)), device=device),
                torch.tensor(float(np.mean(first_dices)), device=device))


# --------------------------------------------------------------------------------------------- trainer


class LocalRoITrainer(Trainer):
    """Trains VISTA3D's point path with simulated protocol clicks (see the module docstring).

    Extra ``train`` keys: ``lr``, ``warmup_steps``, ``min_lr_factor`` (cosine floor, fraction of lr),
    ``freeze_class_head`` (freeze :data:`LABEL_BRANCH_PREFIXES`; when false, DDP runs with
    ``find_unused_parameters``), ``init_key`` (checkpoint entry holding VISTA3D, used when present),
    ``init_strict``, ``init_trusted``, ``steps_per_patch`` (optimizer steps per patch, see
    :meth:`training_steps`), ``click_loss_weight``, ``click_loss_radius`` (:mod:`dcm.training.clicks`).
    """

    train_schema = LocalTrainConfig

    def __init__(self, cfg: Dict[str, Any]):
        super().__init__(cfg)
        #: the checked ``interaction`` and ``data`` sections (``train``: :attr:`train`).
        self.icfg = LocalInteractionConfig.from_mapping(cfg.get("interaction"), "interaction")
        self.data = LocalDataConfig.from_mapping(cfg.get("data"), "data")
        self.patch_size = self.data.patch_zyx
        split_steps(self.icfg.num_clicks + 1, self.train.steps_per_patch)  # checked here
        self.freeze = self.train.freeze_class_head
        if not self.freeze:
            self.train.find_unused_parameters = True

    # ------------------------------------------------------------------ hooks

    def build_model(self) -> InteractiveVISTA3D:
        """VISTA3D from ``cfg['model']``, initialised from ``train.seed`` alone (not the rank)."""
        from dcm.models.vista3d import build_vista3d, load_vista3d_config

        model_cfg = self.cfg.get("model", "vista3d132")
        if not isinstance(model_cfg, Mapping):
            model_cfg = load_vista3d_config(model_cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, 0x715A))
            vista = build_vista3d(model_cfg)
        factor = LocalRoIExpert._size_factor(vista)
        if any(p % f for p, f in zip(self.patch_size, factor)):
            raise ConfigError(f"data.patch_size {self.patch_size} must be divisible by {factor} for this model")
        icfg = self.icfg
        model = InteractiveVISTA3D(vista, num_clicks=icfg.num_clicks, step_loss=icfg.step_loss,
                                   lambda_dice=float(icfg.lambda_dice), lambda_ce=float(icfg.lambda_ce),
                                   click_loss=ClickLoss.from_cfg(self.train))
        if self.freeze:
            for name, p in model.named_parameters():
                if name.startswith(LABEL_BRANCH_PREFIXES):
                    p.requires_grad_(False)
        return model

    def build_dataset(self) -> LocalRoIDataset:
        return LocalRoIDataset(self.data, seed=self.seed)

    def build_scheduler(self, optimizer, steps_per_epoch: int):
        return warmup_cosine(optimizer, self.train.warmup_steps, steps_per_epoch * self.train.epochs,
                             min_factor=float(self.train.min_lr_factor))

    def init_weights(self, model: nn.Module, path: str) -> None:
        """Load VISTA3D weights, strictly unless ``train.init_strict`` is false.

        As :meth:`LocalRoIExpert.from_config`: the ``train.init_key`` entry (``model``: DCM's combined file,
        MONAI / NVIDIA checkpoints) when the checkpoint has it, else the loader's pick (raw state dict,
        ``model_state_dict`` of our own checkpoints, ``module.`` prefixes stripped).
        """
        from dcm.checkpoints import load_checkpoint, load_into

        key = self.train.init_key
        strict = self.train.init_strict
        ckpt = load_checkpoint(path, trusted=self.train.init_trusted)
        if key is not None and not (isinstance(ckpt, Mapping) and isinstance(ckpt.get(key), Mapping)):
            key = None
        try:
            load_into(model, ckpt, strict=strict, key=key, verbose=self.dist.is_main)
        except CheckpointError as e:
            msg = str(e)
            msg = msg[len("<state dict>: "):] if msg.startswith("<state dict>: ") else msg
            raise CheckpointError(f"{path}: {msg}") from e
        self._log(f"initialised from {path} ({'strict' if strict else 'by name and shape'})")

    def select_objects(self, label: np.ndarray, generator: torch.Generator) -> List[int]:
        """Up to ``max_prompt`` labels present in a (z, y, x) patch with at least ``min_object_voxels`` voxels."""
        ids, counts = np.unique(label, return_counts=True)
        present = ids[(ids != 0) & (counts >= self.icfg.min_object_voxels)]
        order = torch.randperm(len(present), generator=generator)[: self.icfg.max_prompt]
        return [int(present[i]) for i in order]

    def first_click(self, mask: np.ndarray, generator: torch.Generator) -> ClickT:
        """The first click on a binary (z, y, x) object mask: the protocol's, or a random object voxel.

        An empty mask (a patch without objects) gets a background click at a random voxel.
        """
        if not mask.any():
            flat = int(torch.randint(mask.size, (1,), generator=generator))
            zyx: ZYX = tuple(int(v) for v in np.unravel_index(flat, mask.shape))  # type: ignore[assignment]
            return click_to_t(Click(zyx, False))
        if self.icfg.first_click == "protocol":
            # The object's innermost voxel: the protocol's click on an empty prediction (always positive).
            return click_to_t(next_click(mask, np.zeros_like(mask)))
        voxels = np.flatnonzero(mask)
        flat = int(voxels[int(torch.randint(len(voxels), (1,), generator=generator))])
        zyx = tuple(int(v) for v in np.unravel_index(flat, mask.shape))  # type: ignore[assignment]
        return click_to_t(Click(zyx, True))

    def training_step(self, model: nn.Module, batch: List[Dict[str, Any]],
                      generator: torch.Generator) -> Dict[str, Any]:
        """One micro-batch of patches through the whole click simulation (one optimizer step).

        Returns:
            ``{"loss", "dice", "dice_first"}`` (scalar tensors; the Dice values are detached) and ``"clicks"``:
            per patch, per prompted object, its clicks ``((z, y, x), label)`` in order (label -1: padding after
            the object was perfect), each corrective one computed from the prediction of the step before.
        """
        return next(iter(self.training_steps(model, batch, generator, 1)))

    def training_steps(self, model: nn.Module, batch: List[Dict[str, Any]], generator: torch.Generator,
                       parts: int) -> Iterator[Dict[str, Any]]:
        """The click simulation of a micro-batch in ``parts`` optimizer steps (``train.steps_per_patch``).

        The ``1 + num_clicks`` click steps are cut into ``parts`` consecutive ranges (:func:`split_steps`);
        each range re-runs the encoder with the current weights, and its loss is one optimizer step; the
        clicks continue across ranges. The released loop took one optimizer step per click (``parts`` 5).
        Outputs as :meth:`training_step`, the Dice of each range's last step.
        """
        device = self.dist.device
        images = torch.stack([s["image"] for s in batch]).to(device)  # (B, 1, Z, Y, X)
        targets: List[torch.Tensor] = []
        firsts: List[List[ClickT]] = []
        for sample in batch:
            label = sample["label"][0].numpy()
            ids = self.select_objects(label, generator)
            # No object in the patch (background crops): one all-background "object" keeps every rank's
            # graph identical, which DDP needs.
            masks = np.stack([label == i for i in ids]) if ids else np.zeros((1,) + label.shape, dtype=bool)
            firsts.append([self.first_click(m, generator) for m in masks])
            targets.append(torch.from_numpy(masks[:, None].astype(np.float32)).to(device))
        module = model.module if hasattr(model, "module") else model
        for steps in split_steps(self.icfg.num_clicks + 1, parts):
            loss, dice, dice_first = model(images, targets, firsts, steps=steps)
            yield {"loss": loss, "dice": dice, "dice_first": dice_first,
                   "clicks": [r["clicks"] for r in module.last_interaction]}

    def log_figure(self, model: InteractiveVISTA3D, batch: List[Dict[str, Any]], epoch: int) -> None:
        """Slice of the first patch of ``batch`` through its first object's first click: image, ground truth,
        final prediction, and the clicks on that slice (fg green, bg red; the number is the click's order)."""
        if self.writer is None or not batch:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0xF16))
        was_training, model.record = model.training, True
        model.eval()
        try:
            with torch.no_grad():
                out = self.training_step(model, batch[:1], generator)
            record = model.last_interaction[0]
        finally:
            model.train(was_training)
            model.record = False
        clicks = record["clicks"][0]
        z = clicks[0][0][0]
        image = batch[0]["image"][0, z].numpy()
        ids = [i for i in np.unique(batch[0]["label"].numpy()) if i]
        gt, pred = record["gts"][0, z], record["preds"][-1][0, z]
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
        panels = (("image", None), ("ground truth", gt), (f"prediction (Dice {record['dice'][0]:.2f})", pred))
        for ax, (title, mask) in zip(axes, panels):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            for n, (zyx, lab) in enumerate(clicks):
                if lab >= 0 and zyx[0] == z:
                    ax.scatter([zyx[2]], [zyx[1]], c="lime" if lab == 1 else "red", s=30, marker="o" if lab else "x")
                    ax.annotate(str(n), (zyx[2], zyx[1]), color="yellow", fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        n_fg, n_bg = sum(lab == 1 for _, lab in clicks), sum(lab == 0 for _, lab in clicks)
        fig.suptitle(f"epoch {epoch}: {batch[0]['name']}, slice z={z}; {len(ids)} objects in the patch; first object: "
                     f"{n_fg} fg / {n_bg} bg clicks; mean final Dice {float(out['dice']):.2f}", fontsize=8)
        self.writer.add_figure("train/interaction", fig, global_step=epoch, close=True)
        plt.close(fig)
