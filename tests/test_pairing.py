"""Backbone pairing: each RoI strategy over either backbone (released pairing vs the design card's).

Reduced, randomly initialised models on tiny volumes: every policy on both pairings, the swapped experts'
RoIs and network paths against direct model calls, checkpoints by role, config presets and the ablation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from dcm.config import load_config
from dcm.data.cases import Box, Click, ObjectPrompts
from dcm.data.synthetic import generate_case
from dcm.engine.policies import POLICIES
from dcm.engine.predictor import DCMPredictor
from dcm.errors import CheckpointError, ConfigError
from dcm.experts import build_experts
from dcm.experts.backbones import SamMed3DBackbone, Vista3DBackbone, intensity_percentiles, scale_intensity
from dcm.experts.global_roi import GlobalRoIExpert
from dcm.experts.local_roi import LocalRoIExpert, place_window
from dcm.experts.roi import crop_and_resize, paste_back, roi_from_box, znorm_positive

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from stubs import assert_policy_calls, box_step_then_click_step, reduced_sam_med3d, reduced_vista3d  # noqa: E402
PAIRINGS = {"released": "dcm_reduced", "card": "dcm_reduced_card_pairing"}


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@pytest.fixture(scope="module")
def pairings() -> Dict[str, Tuple[dict, dict]]:
    out = {}
    for name, config in PAIRINGS.items():
        cfg = load_config(config)
        torch.manual_seed(0)
        out[name] = (cfg, build_experts(cfg, random_init=True))
    return out


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    return reduced_sam_med3d(seed=1)


@pytest.fixture(scope="module")
def vista() -> torch.nn.Module:
    return reduced_vista3d(seed=2)


def ct_image(shape, seed: int = 0) -> np.ndarray:
    """CT-like intensities (negative background), so that a raw 0 is not a normalised 0."""
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)


def box(z=(8, 14), y=(12, 30), x=(10, 25)) -> Box:
    return Box(z_min=z[0], z_max=z[1], z_mid=(z[0] + z[1]) // 2, z_mid_y_min=y[0], z_mid_y_max=y[1],
               z_mid_x_min=x[0], z_mid_x_max=x[1])


def obj_with(*clicks, b=None, label=1) -> ObjectPrompts:
    return ObjectPrompts(label=label, box=b, clicks=[Click(tuple(p), pos) for p, pos in clicks])


# ----------------------------------------------------------------------------------------- both pairings


def test_pairings_build_the_configured_backbones(pairings):
    released, card = pairings["released"][1], pairings["card"][1]
    assert isinstance(released["global"].backbone, SamMed3DBackbone)
    assert isinstance(released["local"].backbone, Vista3DBackbone)
    assert isinstance(card["global"].backbone, Vista3DBackbone)
    assert isinstance(card["local"].backbone, SamMed3DBackbone)
    assert (card["global"].frame_size, card["global"].mask_size) == (32, None)
    assert card["local"].window_size == (64, 64, 64)  # the reduced SAM-Med3D's img_size


@pytest.mark.parametrize("pairing", sorted(PAIRINGS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_box_step_and_click_step(pairings, pairing, policy):
    cfg, experts = pairings[pairing]
    # tests/test_inference.py runs the released pairing on several objects already: one is enough here
    n_objects = 2 if pairing == "card" else 1
    arrays = generate_case("CT", seed=7, shape=(16, 32, 32), n_objects=n_objects, with_tube=False)
    gts = arrays["gts"]
    predictor = DCMPredictor(experts, dict(cfg["engine"], policy=policy))
    segs, segs2, calls = box_step_then_click_step(predictor, experts, arrays, "CT_pairing")
    assert segs.shape == segs2.shape == gts.shape and segs2.dtype == np.uint8
    assert_policy_calls(policy, calls, int(gts.max()))


# ---------------------------------------------------------------------------------- the default pairing


def test_default_pairing_is_bit_identical_to_the_direct_network_path(sam, vista):
    """Defaults: global = SAM-Med3D, local = VISTA3D, with exactly the pre-refactor computation (VISTA3D's point
    head: with ``point_head`` cached; the default fast one to float rounding)."""
    image = np.random.default_rng(0).integers(0, 256, size=(24, 48, 48)).astype(np.uint8)
    glob = GlobalRoIExpert(sam, {})
    assert glob.cfg["backbone"] == "sam_med3d" and glob.frame_size == 64 and glob.mask_size == 32
    glob.set_image(image, (2.0, 1.0, 1.0))
    prev = np.zeros(image.shape, np.uint8)
    prev[9:14, 14:28, 12:24] = 1
    b = box()
    o = obj_with(((11, 20, 15), False), ((12, 25, 20), True), b=b)
    pred = glob.predict(o, prev)

    roi = roi_from_box(b)
    x = torch.from_numpy(np.ascontiguousarray(znorm_positive(np.asarray(crop_and_resize(image, roi), np.float32))))
    mask = (crop_and_resize(prev, roi, mode="nearest")[::2, ::2, ::2] == 1).astype(np.float32)
    coords = np.concatenate([[[31.0, 31.0, 31.0]], roi.to_frame([(11, 20, 15), (12, 25, 20)])]).astype(np.float32)
    pe = sam.prompt_encoder
    with torch.inference_mode():
        emb = sam.image_encoder(x[None, None])
        sparse, dense = pe(points=(torch.from_numpy(coords)[None], torch.tensor([[1, 0, 1]])), boxes=None,
                           masks=torch.from_numpy(mask)[None, None])
        logits, _ = sam.mask_decoder(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
    ref, slices = paste_back(torch.sigmoid(logits[0, 0].float()), roi, image.shape)
    assert pred.roi == slices
    assert np.array_equal(pred.prob, ref.numpy())

    local = LocalRoIExpert(vista, {"window_size": 32})
    assert local.cfg["backbone"] == "vista3d"
    assert LocalRoIExpert(vista, {}).window_size == (128, 128, 128)
    small = np.random.default_rng(6).integers(0, 256, size=(12, 20, 40)).astype(np.uint8)
    local.set_image(small)
    pred = local.predict(obj_with(((11, 0, 39), True)), prev_pred=np.ones_like(small))  # prev_pred unused
    window = place_window((11, 0, 39), small.shape, (32, 32, 32))
    lo, hi = intensity_percentiles(small)
    crop = np.pad(scale_intensity(small[window.roi], lo, hi), window.pad)
    with torch.inference_mode():
        emb, _ = vista.image_encoder(torch.from_numpy(crop)[None, None], with_point=True, with_label=False)
        out = vista.point_head(emb, torch.tensor([[[21.0, 6.0, 31.0]]]), torch.tensor([[1]]), class_vector=None)
    ref = torch.sigmoid(out[0, 0, 10:22, 6:26, :].float()).numpy()
    # VISTA3D's point head: the default (fast) equals MONAI's up to float rounding, point_head cached bit for bit
    assert pred.roi == window.roi and np.allclose(pred.prob, ref, rtol=0, atol=1e-6)
    local.backbone.set_point_head("cached")
    local.clear_cache()
    pred = local.predict(obj_with(((11, 0, 39), True)), prev_pred=np.ones_like(small))
    assert pred.roi == window.roi and np.array_equal(pred.prob, ref)


# ------------------------------------------------------------------------------------- swapped experts


def test_global_strategy_on_vista3d(vista, sam):
    """Box x 1.8 RoI whatever the backbone; percentile normalisation before resampling; direct-call equality."""
    image = ct_image((24, 48, 48))
    ex = GlobalRoIExpert(vista, {"backbone": "vista3d", "frame_size": 32, "model": "vista3d_reduced"})
    assert ex.frame_size == 32 and ex.mask_size is None
    ex.set_image(image, (2.0, 1.0, 1.0))
    assert ex.backbone.intensity_range == intensity_percentiles(image)  # whole image, once per image
    b = box(z=(0, 6), y=(2, 20), x=(30, 47))  # at the image border: the RoI reaches outside
    o = obj_with(((3, 10, 40), True), ((5, 15, 35), False), b=b)
    roi = ex.global_roi(o)
    assert roi == roi_from_box(b, 1.8, 8, 32)
    assert roi.size == (13, 34, 32) and roi.center == b.center_zyx
    sam_ex = GlobalRoIExpert(sam, {})
    sam_ex.set_image(image, (2.0, 1.0, 1.0))
    sam_roi = sam_ex.global_roi(o)  # the same centre and extent on SAM-Med3D's 64^3 frame
    assert (sam_roi.center, sam_roi.size, sam_roi.out_size) == (roi.center, roi.size, 64)

    x = ex.frame_input(roi)[0, 0].numpy()
    lo, hi = intensity_percentiles(image)
    expected = crop_and_resize(scale_intensity(image, lo, hi), roi)  # normalise, then zero padding
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert x.shape == (32, 32, 32) and x[:2].max() == 0.0  # frame slices wholly outside the image: padding 0

    assert ex.mask_prompt(o, roi, np.ones(image.shape, np.uint8)) is None
    coords, labels = ex.prompts_of(o, roi)
    assert labels.tolist() == [1, 1, 0] and np.allclose(coords[0], 15.0)
    pred = ex.predict(o, np.ones(image.shape, np.uint8))
    with torch.inference_mode():
        logits = vista(torch.from_numpy(expected)[None, None], point_coords=torch.from_numpy(coords)[None],
                       point_labels=torch.from_numpy(labels)[None])
    ref, slices = paste_back(torch.sigmoid(logits[0, 0]), roi, image.shape)
    assert pred.roi == slices == roi.slices(image.shape) and pred.expert == "global"
    np.testing.assert_allclose(pred.prob, ref.numpy(), atol=1e-5)
    runs = ex.encoder_runs
    ex.predict(obj_with(((3, 10, 40), True), b=b))  # same RoI: cached encoder output
    assert ex.encoder_runs == runs == 1


def test_local_strategy_on_sam_med3d(sam):
    """Window = the SAM model's img_size at native resolution, centred at the last click; direct-call equality."""
    image = ct_image((24, 80, 96), seed=1)
    ex = LocalRoIExpert(sam, {"backbone": "sam_med3d"})
    assert ex.window_size == (64, 64, 64) and ex.intensity_range is None
    ex.set_image(image)
    prev = np.zeros(image.shape, np.uint8)
    prev[8:16, 40:60, 50:70] = 3
    prev[10:12, 45:50, 55:60] = 1
    o = obj_with(((5, 20, 30), False), ((12, 50, 60), True), label=3)
    window = ex.window_of(o)
    assert window == place_window((12, 50, 60), image.shape, (64, 64, 64))
    assert [(s.start, s.stop) for s in window.roi] == [(0, 24), (16, 80), (28, 92)]
    assert window.pad == ((20, 20), (0, 0), (0, 0))
    coords, labels = ex.prompts_of(o, window)
    assert coords.tolist() == [[25, 4, 2], [32, 34, 32]] and labels.tolist() == [0, 1]
    mask = ex.mask_prompt(o, window, prev)
    full = np.pad(prev[window.roi] == 3, window.pad)
    np.testing.assert_array_equal(mask, full[::2, ::2, ::2].astype(np.float32))
    assert mask.shape == (32, 32, 32) and 0 < mask.sum() < mask.size
    assert LocalRoIExpert(sam, {"mask_prompt": "none"}).mask_prompt(o, window, prev) is None

    pred = ex.predict(o, prev)
    x = znorm_positive(np.pad(image[window.roi].astype(np.float32), window.pad))  # padding is in the frame
    np.testing.assert_allclose(ex.window_input(window)[0, 0].numpy(), x, atol=1e-6)
    with torch.no_grad():
        low, _ = sam(torch.from_numpy(x)[None, None],
                     points=(torch.tensor(coords, dtype=torch.float32)[None], torch.tensor(labels)[None]),
                     masks=torch.from_numpy(mask)[None, None])
    full_logits = F.interpolate(low, size=(64, 64, 64), mode="trilinear", align_corners=False)[0, 0]
    ref = torch.sigmoid(full_logits[20:44]).numpy()
    assert pred.roi == window.roi and pred.expert == "local" and pred.prob.shape == image[window.roi].shape
    np.testing.assert_allclose(pred.prob, ref, atol=1e-5)
    ex.predict(obj_with(((12, 50, 60), True), ((13, 55, 60), False), label=3), prev)  # same window: cached
    assert ex.encoder_runs == 1


def test_frame_constraints_and_mismatches(sam, vista):
    with pytest.raises(ConfigError, match="img_size"):
        LocalRoIExpert(sam, {"window_size": 32})
    with pytest.raises(ConfigError, match="img_size"):
        GlobalRoIExpert(sam, {"frame_size": 32})
    with pytest.raises(ConfigError, match="divisible"):
        GlobalRoIExpert(vista, {"frame_size": 36})
    with pytest.raises(ConfigError, match="backbone is 'vista3d' but the model is a sam_med3d"):
        GlobalRoIExpert(sam, {"backbone": "vista3d"})
    with pytest.raises(ConfigError, match="backbone must be one of"):
        LocalRoIExpert(vista, {"backbone": "unet"})
    with pytest.raises(ConfigError, match="sam_med3d preset but the backbone is 'vista3d'"):
        GlobalRoIExpert.from_config({"backbone": "vista3d", "model": "sam_med3d_64_reduced"})
    with pytest.raises(ConfigError, match="strictly"):
        GlobalRoIExpert.from_config({"backbone": "vista3d", "model": "vista3d_reduced", "init_partial": True},
                                    weights=vista.state_dict())


# ------------------------------------------------------------------------------------------- checkpoints


def test_combined_checkpoint_of_the_swapped_models_loads_strictly(tmp_path):
    from dcm.checkpoints import combine

    cfg = load_config("dcm_reduced_card_pairing")
    torch.manual_seed(3)
    trained = build_experts(cfg, random_init=True)
    # training checkpoints in each expert's own layout: VISTA3D {'model', 'epoch'}, SAM-Med3D {'model_state_dict'}
    torch.save({"model": trained["global"].model.state_dict(), "epoch": 1}, tmp_path / "global.pt")
    torch.save({"model_state_dict": trained["local"].model.state_dict(), "epoch": 1}, tmp_path / "local.pt")
    combined = combine(tmp_path / "global.pt", tmp_path / "local.pt", tmp_path / "dcm_card.pt")
    ckpt = torch.load(combined, weights_only=True)
    assert set(ckpt) == {"model_state_dict", "model"}  # by role, whatever the backbone
    assert any(k.startswith("point_head.") for k in ckpt["model_state_dict"])
    assert any(k.startswith("prompt_encoder.") for k in ckpt["model"])

    loaded = build_experts(cfg, weights=combined)
    for role in ("global", "local"):
        want, got = trained[role].model.state_dict(), loaded[role].model.state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), role
    # the released pairing's file does not fit the swapped experts
    released = build_experts(load_config("dcm_reduced"), random_init=True)
    torch.save({"model_state_dict": released["global"].model.state_dict(),
                "model": released["local"].model.state_dict()}, tmp_path / "dcm.pt")
    with pytest.raises(CheckpointError):
        build_experts(cfg, weights=tmp_path / "dcm.pt")


# --------------------------------------------------------------------------------------- configs / ablation


def test_card_presets_and_pairing_ablation_agree():
    card = load_config("dcm_card_pairing")
    assert (card["global_expert"]["backbone"], card["global_expert"]["model"]) == ("vista3d", "vista3d132")
    assert (card["local_expert"]["backbone"], card["local_expert"]["model"]) == ("sam_med3d", "sam_med3d_64")
    assert card["global_expert"]["frame_size"] % 16 == 0
    reduced = load_config("dcm_reduced_card_pairing")
    assert (reduced["global_expert"]["model"], reduced["local_expert"]["model"]) == ("vista3d_reduced",
                                                                                    "sam_med3d_64_reduced")
    from dcm.ablate import variant_configs

    for name, reduced_too in (("pairing.yaml", False), ("pairing_reduced.yaml", True)):
        ablation = yaml.safe_load((REPO / "configs" / "ablations" / name).read_text())
        variants = {k: cfg for k, (cfg, _) in variant_configs(ablation).items()}
        assert variants["released"] == load_config("dcm_reduced" if reduced_too else "dcm")
        assert variants["card"] == (reduced if reduced_too else card)
    # the released pairing is the default and is spelled out in dcm.yaml
    released = load_config("dcm")
    assert (released["global_expert"]["backbone"], released["local_expert"]["backbone"]) == ("sam_med3d", "vista3d")
