"""MONAI VISTA3D, the backbone of DCM's local-RoI expert, built from a config.

Two variants, both made of MONAI's own classes (nothing here re-implements VISTA3D):

* ``variant: full``: exactly ``monai.networks.nets.vista3d132(in_channels=1)`` (218 M parameters,
  259 state-dict tensors), the layout of the released DCM and NVIDIA checkpoints;
* ``variant: reduced``: the same :class:`~monai.networks.nets.vista3d.VISTA3D` with a narrow, shallow
  :class:`~monai.networks.nets.SegResNetDS2` encoder and matching ``PointMappingSAM`` /
  ``ClassMappingClassify`` heads, for tests and CPU experiments.

Input of the built module: ``(B, in_channels, Z, Y, X)``; every spatial size must be divisible by
``2 ** (len(blocks_down) - 1)`` (16 for the full model). Point coordinates given to it are voxel indices in
the same axis order as the input tensor, here ``(z, y, x)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from monai.networks.nets import SegResNetDS2
from monai.networks.nets.vista3d import VISTA3D, ClassMappingClassify, PointMappingSAM, vista3d132

from dcm.errors import ConfigError
from dcm.models.onednn import use_onednn_conv3d

__all__ = ["VISTA3D_DEFAULTS", "build_vista3d", "check_vista3d_config", "load_vista3d_config", "vista3d_shape_factor",
           "count_parameters"]

#: Every key ``build_vista3d`` understands, with the value the full model uses.
VISTA3D_DEFAULTS: Dict[str, Any] = {
    "name": "vista3d132",
    "variant": "full",
    "in_channels": 1,
    # Encoder width: SegResNetDS2 init_filters = out_channels = the heads' feature size.
    "encoder_embed_dim": 48,
    "blocks_down": (1, 2, 2, 4, 4),
    "norm": "instance",
    # Size of the class-embedding tables (point and class heads) and the last supported class index.
    "n_classes": 512,
    "last_supported": 132,
    "class_head_mlp": True,
}

_FULL_ONLY = ("encoder_embed_dim", "blocks_down", "norm", "n_classes", "last_supported", "class_head_mlp")

def check_vista3d_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """A VISTA3D model config with :data:`VISTA3D_DEFAULTS` filled in; ConfigError naming the key otherwise."""
    unknown = sorted(set(cfg) - set(VISTA3D_DEFAULTS))
    if unknown:
        raise ConfigError(f"vista3d config: unknown keys {unknown} (known: {sorted(VISTA3D_DEFAULTS)})")
    merged = dict(VISTA3D_DEFAULTS)
    merged.update(cfg)
    if merged["variant"] not in ("full", "reduced"):
        raise ConfigError(f"vista3d config: variant must be 'full' or 'reduced', got {merged['variant']!r}")
    dim = merged["encoder_embed_dim"]
    # PointMappingSAM uses 4 heads on attention downsampled by 2, so the width must be a multiple of 8.
    if not isinstance(dim, int) or dim <= 0 or dim % 8:
        raise ConfigError(f"vista3d config: encoder_embed_dim must be a positive multiple of 8, got {dim!r}")
    blocks = merged["blocks_down"]
    if not isinstance(blocks, (list, tuple)) or not blocks or not all(isinstance(b, int) and b > 0 for b in blocks):
        raise ConfigError(f"vista3d config: blocks_down must be a non-empty list of positive ints, got {blocks!r}")
    merged["blocks_down"] = tuple(blocks)
    if not 0 < merged["last_supported"] < merged["n_classes"]:
        raise ConfigError(
            f"vista3d config: need 0 < last_supported ({merged['last_supported']}) < n_classes ({merged['n_classes']})"
        )
    return merged


def build_vista3d(cfg: Optional[Mapping[str, Any]] = None) -> VISTA3D:
    """Build MONAI's VISTA3D from a model config (see ``configs/models/vista3d*.yaml``).

    Args:
        cfg: keys of :data:`VISTA3D_DEFAULTS`; missing keys take the full model's values. With
            ``variant: full`` the architecture keys must be absent or equal to the full model's (so that a
            "full" config always loads the released weights).

    Returns:
        A :class:`monai.networks.nets.vista3d.VISTA3D` on the current default device, in training mode, its
        3D convolutions on oneDNN for CPU float32 (:func:`dcm.models.onednn.use_onednn_conv3d`).

    Raises:
        ConfigError: unknown keys, an invalid value, or a ``full`` config that changes the architecture.
    """
    cfg = check_vista3d_config(cfg or {})
    if cfg["variant"] == "full":
        changed = [k for k in _FULL_ONLY if cfg[k] != VISTA3D_DEFAULTS[k]]
        if changed:
            raise ConfigError(f"vista3d config: variant 'full' is vista3d132; it cannot change {changed}")
        return use_onednn_conv3d(
            vista3d132(encoder_embed_dim=VISTA3D_DEFAULTS["encoder_embed_dim"], in_channels=cfg["in_channels"])
        )

    dim = cfg["encoder_embed_dim"]
    encoder = SegResNetDS2(
        in_channels=cfg["in_channels"],
        blocks_down=cfg["blocks_down"],
        norm=cfg["norm"],
        out_channels=dim,
        init_filters=dim,
        dsdepth=1,
    )
    point_head = PointMappingSAM(feature_size=dim, n_classes=cfg["n_classes"], last_supported=cfg["last_supported"])
    class_head = ClassMappingClassify(n_classes=cfg["n_classes"], feature_size=dim, use_mlp=cfg["class_head_mlp"])
    return use_onednn_conv3d(VISTA3D(image_encoder=encoder, class_head=class_head, point_head=point_head))


def load_vista3d_config(name_or_path: Union[str, Path]) -> Dict[str, Any]:
    """Read and check a model config: a YAML file path, or a preset name from ``configs/models`` (``vista3d132``).

    Read by :func:`dcm.config.load_model_config`, the one config reader.
    """
    from dcm.config import load_model_config

    cfg = load_model_config(name_or_path)
    check_vista3d_config(cfg)
    return cfg


def vista3d_shape_factor(model: VISTA3D) -> Tuple[int, int, int]:
    """What each (z, y, x) input size must be divisible by for ``model`` (16, 16, 16 for vista3d132)."""
    encoder = model.image_encoder
    if hasattr(encoder, "shape_factor"):
        return tuple(int(f) for f in encoder.shape_factor())  # type: ignore[return-value]
    return (1, 1, 1)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ point head
#
# MONAI's ``PointMappingSAM.forward`` redoes, at every click, work that does not depend on the clicks, and
# spends most of the rest on its upscaling at full resolution. :class:`FastPointHead` runs the same module (its
# weights, its sub-modules) in two parts:
#
# * :meth:`FastPointHead.prepare`, once per encoder output: ``feat_downsample``, the dense positional
#   encoding and, in the first two-way block, the projections of the image tokens (keys and values of the
#   token -> image attention, queries of the image -> token attention). The same operations on the same
#   tensors as MONAI, so the cached values are bit-for-bit MONAI's; the encoder output itself is not kept.
# * :meth:`FastPointHead.__call__`, per click: the prompt tokens, the two-way transformer (MONAI's code,
#   reading those cached projections) and the output upscaling. ``upscaling="monai"`` runs MONAI's
#   ``output_upscaling`` and mask product (bit-equal to ``PointMappingSAM.forward``); ``"fused"`` (default)
#   computes the same function another way, equal up to float rounding (see :func:`fused_upscaling`).


def _attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               projected: Tuple[bool, bool, bool] = (False, False, False)) -> torch.Tensor:
    """MONAI's ``vista3d.Attention.forward`` where ``projected[i]`` marks q / k / v as already projected."""
    q = q if projected[0] else attn.q_proj(q)
    k = k if projected[1] else attn.k_proj(k)
    v = v if projected[2] else attn.v_proj(v)
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    _, _, _, c_per_head = q.shape
    scores = q @ k.permute(0, 1, 3, 2)
    scores = scores / math.sqrt(c_per_head)
    scores = torch.softmax(scores, dim=-1)
    out = scores @ v
    out = attn._recombine_heads(out)
    return attn.out_proj(out)


class PointHeadState:
    """What :class:`FastPointHead` keeps of one encoder output: everything its point head computes without
    the clicks (one window of one image).

    Attributes:
        out_shape: (z, y, x) shape of the encoder output (= the window, the logits' shape).
        keys: (1, N, C) image tokens, ``feat_downsample(embedding)`` flattened (N = the downsampled voxels).
        image_pe: (1, N, C) dense positional encoding of the downsampled grid.
        t2i_k, t2i_v: (1, N, C / 2) first block's token -> image key and value projections of the image tokens.
        i2t_q: (1, N, C / 2) first block's image -> token query projection of the image tokens.
        grid: (h, w, d) shape of the downsampled grid.
    """

    def __init__(self, out_shape, keys, image_pe, t2i_k, t2i_v, i2t_q, grid):
        self.out_shape = tuple(int(s) for s in out_shape)
        self.keys = keys
        self.image_pe = image_pe
        self.t2i_k = t2i_k
        self.t2i_v = t2i_v
        self.i2t_q = i2t_q
        self.grid = tuple(int(s) for s in grid)
        # The last answer: (prompt key, logits); the same prompts again return them without recomputing.
        self.last: Optional[Tuple[Any, torch.Tensor]] = None

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def nbytes(self) -> int:
        """Bytes held by the cached tensors (views of one tensor counted once)."""
        seen, total = set(), 0
        for t in (self.keys, self.image_pe, self.t2i_k, self.t2i_v, self.i2t_q):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding=(0, 0, 0)) -> torch.Tensor:
    """A stride-1 3D convolution on oneDNN for CPU float32 (as :class:`dcm.models.onednn.OneDNNConv3d`)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()
            and not torch.is_autocast_enabled("cpu")):
        return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, list(padding), [1, 1, 1],
                                        [1, 1, 1], 1)
    return torch.nn.functional.conv3d(x, weight, bias, padding=padding)


#: Sub-pixel form of ConvTranspose3d(kernel 3, stride 2, padding 1, output_padding 1), per axis: the output
#: voxel 2j + parity is sum over (tap, offset) of weight[tap] * input[j + offset].
_PHASE_TAPS = {0: ((1, 0),), 1: ((2, 0), (0, 1))}


def _is_plain_upscaling(seq: torch.nn.Module) -> bool:
    """Whether ``seq`` is PointMappingSAM's ``output_upscaling`` as MONAI builds it (what the fused path
    reproduces): ConvTranspose3d(k3, s2, p1, op1), InstanceNorm3d (input statistics), GELU (exact), Conv3d(k3,
    p1)."""
    try:
        convt, norm, act, conv = list(seq)
    except (TypeError, ValueError):
        return False
    return (
        type(convt) is torch.nn.ConvTranspose3d and convt.kernel_size == (3, 3, 3) and convt.stride == (2, 2, 2)
        and convt.padding == (1, 1, 1) and convt.output_padding == (1, 1, 1) and convt.dilation == (1, 1, 1)
        and convt.groups == 1 and convt.padding_mode == "zeros"
        and isinstance(norm, torch.nn.InstanceNorm3d) and not norm.track_running_stats
        and type(act) is torch.nn.GELU and act.approximate == "none"
        and isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def fused_upscaling(seq: torch.nn.Module, src: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """``hyper @ seq(src)`` for PointMappingSAM's ``output_upscaling`` ``seq``, without its full-resolution
    C-channel convolution.

    ``seq`` = ConvTranspose3d(k3, s2) -> InstanceNorm3d -> GELU -> Conv3d(k3); the mask is the product of the
    hypernetwork vector ``hyper`` (1, 1, C) with the C output channels. Three exact rewrites:

    1. the transposed convolution is computed as 8 sub-pixel ("phase") convolutions on the coarse grid, one per
       output parity (z, y, x), with the matching taps of its kernel (1 or 2 per axis): no multiplications by
       the zeros a transposed convolution inserts;
    2. instance-norm statistics (over all phases together) and GELU are applied in place, in that phase layout;
    3. the last convolution is linear, so ``hyper @ conv(g) = conv(g, hyper @ W) + hyper . b``: a C -> 1
       convolution (C times fewer multiply-adds), computed per tap as a (27, C) @ (C, voxels) product on each
       phase and summed with the tap's shift in phase space.

    Equal to ``hyper @ seq(src)`` up to float rounding (sums in another order).

    Args:
        seq: the ``output_upscaling`` module (checked with :func:`_is_plain_upscaling` by the caller).
        src: (1, C, h, w, d) coarse features.
        hyper: (1, 1, C) hypernetwork output.

    Returns:
        (1, 1, 2h, 2w, 2d) mask logits.
    """
    convt, norm, _, conv = list(seq)
    _, c, h, w, d = src.shape
    dtype = torch.promote_types(src.dtype, convt.weight.dtype) if not torch.is_autocast_enabled(src.device.type) \
        else src.dtype
    # 1. ConvTranspose3d as 8 sub-pixel convolutions on the coarse grid, input zero-padded by one at the end.
    wt = convt.weight.transpose(0, 1)  # (out, in, kz, ky, kx) of a plain cross-correlation
    xp = torch.nn.functional.pad(src, (0, 1, 0, 1, 0, 1))
    phases = torch.empty((8, c, h, w, d), dtype=dtype, device=src.device)
    for p in range(8):
        pz, py, px = (p >> 2) & 1, (p >> 1) & 1, p & 1
        kz, ky, kx = ([t for t, _ in _PHASE_TAPS[q]] for q in (pz, py, px))
        weight = wt[:, :, kz][:, :, :, ky][:, :, :, :, kx]
        phases[p] = _conv3d(xp[:, :, : h + pz, : w + py, : d + px], weight, convt.bias)[0]
    # 2. InstanceNorm3d over the whole 2h x 2w x 2d volume (all phases), then exact GELU, in place.
    flat = phases.view(8, c, -1)
    var, mean = torch.var_mean(flat.transpose(0, 1).reshape(c, -1), dim=1, unbiased=False)
    rstd = torch.rsqrt(var + norm.eps)
    flat.sub_(mean[None, :, None]).mul_(rstd[None, :, None])
    if norm.affine:
        flat.mul_(norm.weight[None, :, None]).add_(norm.bias[None, :, None])
    torch.ops.aten.gelu_(flat)
    # 3. The C -> C convolution folded with hyper: a C -> 1 convolution, tap by tap in phase space.
    vec = hyper.reshape(1, -1).to(conv.weight.dtype)
    weff = (vec @ conv.weight.reshape(conv.weight.shape[0], -1)).reshape(c, 27).t().contiguous().to(flat.dtype)
    out = torch.zeros((h, 2, w, 2, d, 2), dtype=flat.dtype, device=src.device)
    if conv.bias is not None:
        out += (vec @ conv.bias.reshape(-1, 1).to(vec.dtype)).reshape(()).to(out.dtype)
    fine = out.permute(1, 3, 5, 0, 2, 4)  # (2, 2, 2, h, w, d) view: output parity, coarse voxel
    sizes = (h, w, d)
    for q in range(8):  # input phase q: one (27, C) @ (C, voxels) product, each tap added where it lands
        taps = (weff @ flat[q]).view(27, h, w, d)
        qz, qy, qx = (q >> 2) & 1, (q >> 1) & 1, q & 1
        for t in range(27):
            dz, dy, dx = t // 9 - 1, (t // 3) % 3 - 1, t % 3 - 1
            # fine output 2j + p reads fine input 2j + p + delta = 2 (j + shift) + q
            target, source = [], []
            for delta, qq, n in zip((dz, dy, dx), (qz, qy, qx), sizes):
                p = (qq - delta) % 2
                shift = (p + delta - qq) // 2  # input coarse index = j + shift
                lo, hi = max(0, -shift), min(n, n - shift)
                target.append((p, slice(lo, hi)))
                source.append(slice(lo + shift, hi + shift))
            (pz, sz), (py, sy), (px, sx) = target
            fine[pz, py, px][sz, sy, sx] += taps[t][source[0], source[1], source[2]]
    return out.view(1, 1, 2 * h, 2 * w, 2 * d)


class FastPointHead:
    """MONAI VISTA3D's point head (``PointMappingSAM``) with its click-independent work done once per encoder
    output.

    ``head(head.prepare(embedding), coords, labels)`` equals ``point_head(embedding, coords, labels)``:
    bit for bit with ``upscaling="monai"``, up to float rounding with ``"fused"`` (about 1e-6 of the logits'
    range in float32; the tests compare at 1e-5).

    Args:
        point_head: the model's ``PointMappingSAM`` (its weights are read at every call, never copied).
        upscaling: ``fused`` (:func:`fused_upscaling`) or ``monai`` (its ``output_upscaling`` as is). A
            module other than MONAI's (:func:`_is_plain_upscaling`) always runs as is.
    """

    UPSCALING = ("fused", "monai")

    def __init__(self, point_head: torch.nn.Module, upscaling: str = "fused"):
        if upscaling not in self.UPSCALING:
            raise ConfigError(f"vista3d point head: upscaling must be one of {self.UPSCALING}, got {upscaling!r}")
        self.point_head = point_head
        self.upscaling = upscaling

    def prepare(self, embedding: torch.Tensor) -> PointHeadState:
        """The click-independent part of the point head for one encoder output ``embedding`` (1, C, Z, Y, X).

        Same operations as ``PointMappingSAM.forward`` / ``TwoWayTransformer.forward`` /
        ``TwoWayAttentionBlock.forward`` (layer 0) on the same tensors, hence bit-equal values.
        """
        ph = self.point_head
        if embedding.shape[0] != 1:
            raise ValueError(f"vista3d point head: one encoder output at a time, got batch {embedding.shape[0]}")
        out_low = ph.feat_downsample(embedding)
        out_shape = tuple(embedding.shape[-3:])
        src = torch.repeat_interleave(out_low, 1, dim=0)
        pos_src = torch.repeat_interleave(ph.pe_layer(out_low.shape[-3:]).unsqueeze(0), 1, dim=0)
        keys = src.flatten(2).permute(0, 2, 1)
        image_pe = pos_src.flatten(2).permute(0, 2, 1)
        first = ph.transformer.layers[0]
        k = keys + image_pe
        return PointHeadState(
            out_shape=out_shape,
            keys=keys,
            image_pe=image_pe,
            t2i_k=first.cross_attn_token_to_image.k_proj(k),
            t2i_v=first.cross_attn_token_to_image.v_proj(keys),
            i2t_q=first.cross_attn_image_to_token.q_proj(k),
            grid=out_low.shape[-3:],
        )

    def tokens(self, point_coords: torch.Tensor, point_labels: torch.Tensor, out_shape,
               class_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1 + N + 1, C) prompt tokens, as ``PointMappingSAM.forward`` builds them."""
        ph = self.point_head
        points = point_coords + 0.5
        point_embedding = ph.pe_layer.forward_with_coords(points, out_shape)
        point_embedding[point_labels == -1] = 0.0
        point_embedding[point_labels == -1] += ph.not_a_point_embed.weight
        point_embedding[point_labels == 0] += ph.point_embeddings[0].weight
        point_embedding[point_labels == 1] += ph.point_embeddings[1].weight
        point_embedding[point_labels == 2] += ph.point_embeddings[0].weight + ph.special_class_embed.weight
        point_embedding[point_labels == 3] += ph.point_embeddings[1].weight + ph.special_class_embed.weight
        output_tokens = ph.mask_tokens.weight.unsqueeze(0).expand(point_embedding.size(0), -1, -1)
        if class_vector is None:
            last = ph.supported_embed.weight.unsqueeze(0).expand(point_embedding.size(0), -1, -1)
        else:
            last = torch.stack([ph.zeroshot_embed.weight if i > ph.last_supported else ph.supported_embed.weight
                                for i in class_vector])
        return torch.cat((output_tokens, point_embedding, last), dim=1)

    def transformer(self, state: PointHeadState, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """MONAI's ``TwoWayTransformer.forward`` for one prompt (tokens (1, T, C)), the first block reading the
        cached image projections: ``(queries, keys)``."""
        tr = self.point_head.transformer
        queries, keys, query_pe, key_pe = tokens, state.keys, tokens, state.image_pe
        for i, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            q = queries + query_pe
            if i == 0:
                attn_out = _attention(layer.cross_attn_token_to_image, q, state.t2i_k, state.t2i_v, (False, True, True))
            else:
                k = keys + key_pe
                attn_out = layer.cross_attn_token_to_image(q=q, k=k, v=keys)
            queries = layer.norm2(queries + attn_out)
            queries = layer.norm3(queries + layer.mlp(queries))
            q = queries + query_pe
            if i == 0:
                attn_out = _attention(layer.cross_attn_image_to_token, state.i2t_q, q, queries, (True, False, False))
            else:
                attn_out = layer.cross_attn_image_to_token(q=k, k=q, v=queries)  # k = keys + key_pe, as above
            keys = layer.norm4(keys + attn_out)
        q = queries + query_pe
        k = keys + key_pe
        attn_out = tr.final_attn_token_to_image(q=q, k=k, v=keys)
        queries = tr.norm_final_attn(queries + attn_out)
        return queries, keys

    def __call__(self, state: PointHeadState, point_coords: torch.Tensor, point_labels: torch.Tensor,
                 class_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mask logits (B, 1, Z, Y, X) for point prompts ``point_coords`` (B, N, 3), ``point_labels`` (B, N)
        (and ``class_vector`` (B,) or None), as ``PointMappingSAM.forward(embedding, ...)``.

        The same prompts as the previous call on ``state`` return the previous logits (no work).
        """
        ph = self.point_head
        key = (self.upscaling, point_coords.detach().cpu().numpy().tobytes(), tuple(point_coords.shape),
               point_labels.detach().cpu().numpy().tobytes(), tuple(point_labels.shape),
               None if class_vector is None else torch.as_tensor(class_vector).cpu().numpy().tobytes())
        if state.last is not None and state.last[0] == key:
            return state.last[1]
        tokens_all = self.tokens(point_coords, point_labels, state.out_shape, class_vector)
        h, w, d = state.grid
        masks = []
        for b in range(tokens_all.shape[0]):
            queries, keys = self.transformer(state, tokens_all[b : b + 1])
            hyper_in = ph.output_hypernetworks_mlps(queries[:, :1, :])
            src = keys.transpose(1, 2).view(1, keys.shape[-1], h, w, d)
            if self.upscaling == "fused" and _is_plain_upscaling(ph.output_upscaling):
                masks.append(fused_upscaling(ph.output_upscaling, src, hyper_in))
            else:
                up = ph.output_upscaling(src)
                _, c, zz, yy, xx = up.shape
                masks.append((hyper_in @ up.view(1, c, zz * yy * xx)).view(-1, 1, zz, yy, xx))
        logits = torch.vstack(masks)
        state.last = (key, logits)
        return logits
