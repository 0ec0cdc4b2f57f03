"""MONAI VISTA3D, the backbone of DCM's local-RoI expert, built from a config, and its point head with the
click-independent part cached (:class:`FastPointHead`).

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
           "count_parameters", "FastPointHead", "PointHeadState", "fused_upscaling", "folded_conv",
           "image_to_token", "instance_norm_gelu_", "token_to_image", "upscaling_convt"]

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
# * :meth:`FastPointHead.__call__`, per click: the prompt tokens, the two-way transformer and the output
#   upscaling. ``exact=True`` runs MONAI's code on the cached values (bit-equal to ``PointMappingSAM.forward``);
#   ``exact=False`` (default) computes the same functions in fewer operations (:func:`token_to_image`,
#   :func:`image_to_token`, :func:`fused_upscaling`), equal up to float rounding.


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


def _heads(linear: torch.nn.Linear, num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Linear's weight (D, C) and bias (D,) split per head: (H, D / H, C) and (H, D / H)."""
    weight = linear.weight
    bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return weight.view(num_heads, -1, weight.shape[1]), bias.view(num_heads, -1)


def token_to_image(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` (MONAI's ``vista3d.Attention``) for T tokens ``q`` (1, T, C) attending to N image
    tokens ``k``, ``v`` (1, N, C), without projecting the N image tokens.

    Per head h, with Q_h the projected queries: ``Q_h K_h^T = (Q_h Wk_h) k^T + Q_h bk_h``, one (H T, C) @ (C, N)
    product; and since each row of the softmax sums to 1, ``P_h V_h = (P_h v) Wv_h^T + bv_h``, one
    (H T, N) @ (N, C) product. Equal to MONAI's up to float rounding.
    """
    heads = attn.num_heads
    query = attn.q_proj(q)[0]  # (T, D)
    t, d = query.shape
    scale = 1.0 / math.sqrt(d // heads)
    qh = query.view(t, heads, -1).transpose(0, 1) * scale  # (H, T, D / H)
    wk, bk = _heads(attn.k_proj, heads)
    scores = torch.addmm((qh @ bk[:, :, None]).reshape(heads * t, 1), (qh @ wk).reshape(heads * t, -1), k[0].t())
    mixed = torch.softmax(scores, dim=-1) @ v[0]  # (H T, C)
    wv, bv = _heads(attn.v_proj, heads)
    out = (mixed.view(heads, t, -1) @ wv.transpose(1, 2) + bv[:, None, :]).transpose(0, 1).reshape(1, t, d)
    return attn.out_proj(out)


def image_to_token(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   q_projected: bool = False) -> torch.Tensor:
    """``attn(q=q, k=k, v=v)`` (MONAI's ``vista3d.Attention``) for N image tokens ``q`` (1, N, C) attending to T
    tokens ``k``, ``v`` (1, T, C): (1, N, C). ``q_projected``: ``q`` is already ``attn.q_proj(q)`` (1, N, D).

    The scores are computed as (H T, N) (per head ``(K_h Wq_h) q^T + K_h bq_h``, or ``K_h q_h^T``) so that the
    softmax over the T tokens runs along the long axis, and the value and output projections are folded:
    ``out = sum_h P_h (V_h Wo_h^T) + bo``, one (N, H T) @ (H T, C) product. Equal to MONAI's up to float
    rounding.
    """
    heads = attn.num_heads
    key, value = attn.k_proj(k)[0], attn.v_proj(v)[0]  # (T, D)
    t, d = key.shape
    scale = 1.0 / math.sqrt(d // heads)
    kh = key.view(t, heads, -1).transpose(0, 1) * scale  # (H, T, D / H)
    if q_projected:
        scores = kh @ q[0].view(q.shape[1], heads, -1).permute(1, 2, 0)  # (H, T, N)
    else:
        wq, bq = _heads(attn.q_proj, heads)
        scores = torch.addmm((kh @ bq[:, :, None]).reshape(heads * t, 1), (kh @ wq).reshape(heads * t, -1), q[0].t())
        scores = scores.view(heads, t, -1)
    probs = torch.softmax(scores, dim=1).view(heads * t, -1)
    wo = attn.out_proj.weight.view(-1, heads, d // heads).permute(1, 2, 0)  # (H, D / H, C)
    vo = (value.view(t, heads, -1).transpose(0, 1) @ wo).reshape(heads * t, -1)  # (H T, C)
    bo = attn.out_proj.bias if attn.out_proj.bias is not None else vo.new_zeros(vo.shape[1])
    return torch.addmm(bo, probs.t(), vo)[None]


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


def _is_plain_upscaling(seq: torch.nn.Module) -> bool:
    """Whether ``seq`` is PointMappingSAM's ``output_upscaling`` as MONAI builds it (what
    :func:`fused_upscaling` reproduces): ConvTranspose3d(k3, s2, p1, op1), InstanceNorm3d (input statistics),
    GELU (exact), Conv3d(k3, p1)."""
    try:
        convt, norm, act, conv = list(seq)
    except (TypeError, ValueError):
        return False
    return (
        type(convt) is torch.nn.ConvTranspose3d and convt.padding_mode == "zeros"
        and isinstance(norm, torch.nn.InstanceNorm3d) and not norm.track_running_stats
        and type(act) is torch.nn.GELU and act.approximate == "none"
        and isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
        and conv.padding == (1, 1, 1) and conv.dilation == (1, 1, 1) and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def instance_norm_gelu_(flat: torch.Tensor, norm: torch.nn.Module, block_bytes: int = 1 << 26) -> None:
    """InstanceNorm (one instance: statistics over all rows) and exact GELU, in place, on ``flat`` (voxels, C).

    The mean, subtracted in place; the variance of the centred values from the squares of row blocks of about
    ``block_bytes`` (one reused buffer); then scale and GELU in place. Few, large operations: each one is a
    parallel region, and on a busy machine every region waits for its slowest thread.
    """
    n, c = flat.shape
    mean = flat.sum(0) / n
    flat.sub_(mean)
    rows = max(1, min(n, block_bytes // (c * flat.element_size())))
    buffer = torch.empty((rows, c), dtype=flat.dtype, device=flat.device)
    var = torch.zeros_like(mean)
    for block in flat.split(rows):
        var += torch.mul(block, block, out=buffer[: block.shape[0]]).sum(0)
    flat.mul_(torch.rsqrt(var / n + norm.eps))
    if norm.affine:
        flat.mul_(norm.weight).add_(norm.bias)
    torch.ops.aten.gelu_(flat)


def fused_upscaling(seq: torch.nn.Module, src: torch.Tensor, hyper: torch.Tensor, slab: int = 64) -> torch.Tensor:
    """``hyper @ seq(src)`` for PointMappingSAM's ``output_upscaling`` ``seq``, without its full-resolution
    C -> C convolution.

    ``seq`` = ConvTranspose3d -> InstanceNorm3d -> GELU -> Conv3d(k3, p1); the mask is the product of the
    hypernetwork vector ``hyper`` (1, 1, C) with the C output channels. Rewritten as:

    1. the transposed convolution with MONAI's weights in channels-last layout (:func:`upscaling_convt`);
    2. instance norm and GELU in place on that (voxels, C) layout (:func:`instance_norm_gelu_`);
    3. the last convolution is linear, so ``hyper @ conv(g) = conv(g, hyper @ W) + hyper . b``: a C -> 1
       convolution (C times fewer multiply-adds, :func:`folded_conv`).

    Equal to ``hyper @ seq(src)`` up to float rounding (the norm's statistics and the folded convolution sum
    in another order; about 1e-6 of the logits' range in float32).

    Args:
        seq: the ``output_upscaling`` module (:func:`_is_plain_upscaling`).
        src: (1, C, h, w, d) coarse features.
        hyper: (1, 1, C) hypernetwork output.

    Returns:
        (1, 1, Z, Y, X) mask logits on ``seq``'s output grid (2h, 2w, 2d for VISTA3D).
    """
    convt, norm, _, conv = list(seq)
    y = upscaling_convt(convt, src)
    if y.dtype not in (torch.float32, torch.float64):  # under autocast: the norm and the sums in float32
        y = y.float()
    flat = y.permute(0, 2, 3, 4, 1).reshape(-1, y.shape[1])  # a view: one row per voxel, z-major
    instance_norm_gelu_(flat, norm)
    return folded_conv(conv, flat, tuple(y.shape[-3:]), hyper, slab)


def upscaling_convt(convt: torch.nn.Module, src: torch.Tensor) -> torch.Tensor:
    """``convt(src)`` (a ConvTranspose3d) with input and weight in channels-last layout: oneDNN's fast kernel
    on CPU (PyTorch's default layout takes a slower path); the result is channels-last."""
    cl = torch.channels_last_3d
    return torch.nn.functional.conv_transpose3d(
        src.contiguous(memory_format=cl), convt.weight.contiguous(memory_format=cl), convt.bias, convt.stride,
        convt.padding, convt.output_padding, convt.groups, convt.dilation,
    ).contiguous(memory_format=cl)


def folded_conv(conv: torch.nn.Module, flat: torch.Tensor, grid: Tuple[int, int, int], hyper: torch.Tensor,
                slab: int = 64) -> torch.Tensor:
    """``hyper @ conv(g)`` for a Conv3d(k3, p1) ``conv`` and features ``g`` given as ``flat`` (voxels, C), one row
    per voxel of the (z, y, x) ``grid`` in z-major order: (1, 1, *grid).

    The convolution folded with ``hyper`` (1, 1, C) is a C -> 1 convolution; per slab of ``slab`` z-slices
    one (27, C) @ (C, voxels) product gives each kernel tap's map, added at the tap's offset.
    """
    c = flat.shape[1]
    zz, yy, xx = grid
    vec = hyper.reshape(1, -1).to(flat.dtype)
    weight = conv.weight.to(flat.dtype)
    taps = (vec @ weight.reshape(weight.shape[0], -1)).reshape(c, 27).t().contiguous()  # (27, C), tap = kz*9+ky*3+kx
    out = torch.zeros((zz, yy, xx), dtype=flat.dtype, device=flat.device)
    if conv.bias is not None:
        out += (vec @ conv.bias.to(flat.dtype).reshape(-1, 1)).reshape(())
    plane = yy * xx
    for z0 in range(0, zz, slab):
        z1 = min(zz, z0 + slab)
        a, b = max(0, z0 - 1), min(zz, z1 + 1)  # the input slices that reach outputs z0 .. z1 - 1
        maps = (taps @ flat[a * plane : b * plane].t()).view(27, b - a, yy, xx)
        for t in range(27):
            dz, dy, dx = t // 9 - 1, (t // 3) % 3 - 1, t % 3 - 1
            # out[z, y, x] += maps[t][z + dz, y + dy, x + dx] (zero padding outside)
            lo, hi = max(z0, a - dz), min(z1, b - dz)
            ylo, yhi = max(0, -dy), min(yy, yy - dy)
            xlo, xhi = max(0, -dx), min(xx, xx - dx)
            out[lo:hi, ylo:yhi, xlo:xhi] += maps[t, lo + dz - a : hi + dz - a, ylo + dy : yhi + dy, xlo + dx : xhi + dx]
    return out.view(1, 1, zz, yy, xx)


class FastPointHead:
    """MONAI VISTA3D's point head (``PointMappingSAM``) with its click-independent work done once per encoder
    output.

    ``head(head.prepare(embedding), coords, labels)`` equals ``point_head(embedding, coords, labels)``:
    bit for bit with ``exact=True``; up to float rounding with ``exact=False`` (about 1e-6 of the logits'
    range in float32; the tests compare at 1e-5).

    Args:
        point_head: the model's ``PointMappingSAM`` (its weights are read at every call, never copied).
        exact: run MONAI's own code on the cached values; otherwise the attention of the image tokens
            (:func:`token_to_image`, :func:`image_to_token`) and the upscaling (:func:`fused_upscaling`; a
            module other than MONAI's, :func:`_is_plain_upscaling`, always runs as is) are computed in fewer
            operations.
    """

    def __init__(self, point_head: torch.nn.Module, exact: bool = False):
        self.point_head = point_head
        self.exact = bool(exact)

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
        t2i_k = first.cross_attn_token_to_image.k_proj(k)
        t2i_v = first.cross_attn_token_to_image.v_proj(keys)
        i2t_q = first.cross_attn_image_to_token.q_proj(k)
        # From here on keys and image_pe only enter elementwise sums whose other operand sets the result's
        # layout (or a LayerNorm, which reads a contiguous copy): contiguous copies give the same values, and
        # those sums run several times faster than on MONAI's channel-strided views.
        return PointHeadState(
            out_shape=out_shape,
            keys=keys.contiguous(),
            image_pe=image_pe.contiguous(),
            t2i_k=t2i_k,
            t2i_v=t2i_v,
            i2t_q=i2t_q,
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

    def block(self, i: int, state: PointHeadState, queries: torch.Tensor, keys: torch.Tensor,
              query_pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """MONAI's ``TwoWayAttentionBlock.forward`` of block ``i``; block 0 reads the cached projections of the
        image tokens (its ``keys`` are ``state.keys``). Returns ``(queries, keys)``."""
        layer = self.point_head.transformer.layers[i]
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        q = queries + query_pe
        k = None if i == 0 else keys + state.image_pe  # MONAI computes this sum twice per block: same values
        if i == 0:
            attn_out = _attention(layer.cross_attn_token_to_image, q, state.t2i_k, state.t2i_v, (False, True, True))
        elif self.exact:
            attn_out = layer.cross_attn_token_to_image(q=q, k=k, v=keys)
        else:
            attn_out = token_to_image(layer.cross_attn_token_to_image, q, k, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        if i == 0 and self.exact:
            attn_out = _attention(layer.cross_attn_image_to_token, state.i2t_q, q, queries, (True, False, False))
        elif i == 0:
            attn_out = image_to_token(layer.cross_attn_image_to_token, state.i2t_q, q, queries, q_projected=True)
        elif self.exact:
            attn_out = layer.cross_attn_image_to_token(q=k, k=q, v=queries)
        else:
            attn_out = image_to_token(layer.cross_attn_image_to_token, k, q, queries)
        keys = layer.norm4(keys + attn_out)
        return queries, keys

    def final_attention(self, state: PointHeadState, queries: torch.Tensor, keys: torch.Tensor,
                        query_pe: torch.Tensor) -> torch.Tensor:
        """The last token -> image attention and norm of ``TwoWayTransformer.forward``: the queries (with
        ``exact=False`` only the mask token's, the only one the head reads; the norm is per token)."""
        tr = self.point_head.transformer
        if self.exact:
            attn_out = tr.final_attn_token_to_image(q=queries + query_pe, k=keys + state.image_pe, v=keys)
            return tr.norm_final_attn(queries + attn_out)
        queries, query_pe = queries[:, :1], query_pe[:, :1]
        attn_out = token_to_image(tr.final_attn_token_to_image, queries + query_pe, keys + state.image_pe, keys)
        return tr.norm_final_attn(queries + attn_out)

    def transformer(self, state: PointHeadState, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """MONAI's ``TwoWayTransformer.forward`` for one prompt (tokens (1, T, C)), the first block reading the
        cached image projections: ``(queries, keys)`` (:meth:`final_attention`'s queries)."""
        queries, keys = tokens, state.keys
        for i in range(len(self.point_head.transformer.layers)):
            queries, keys = self.block(i, state, queries, keys, tokens)
        return self.final_attention(state, queries, keys, tokens), keys

    def __call__(self, state: PointHeadState, point_coords: torch.Tensor, point_labels: torch.Tensor,
                 class_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mask logits (B, 1, Z, Y, X) for point prompts ``point_coords`` (B, N, 3), ``point_labels`` (B, N)
        (and ``class_vector`` (B,) or None), as ``PointMappingSAM.forward(embedding, ...)``.

        The same prompts as the previous call on ``state`` return the previous logits (no work).
        """
        ph = self.point_head
        key = (self.exact, point_coords.detach().cpu().numpy().tobytes(), tuple(point_coords.shape),
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
            if not self.exact and _is_plain_upscaling(ph.output_upscaling):
                masks.append(fused_upscaling(ph.output_upscaling, src, hyper_in))
            else:
                up = ph.output_upscaling(src)
                _, c, zz, yy, xx = up.shape
                masks.append((hyper_in @ up.view(1, c, zz * yy * xx)).view(-1, 1, zz, yy, xx))
        logits = torch.vstack(masks)
        state.last = (key, logits)
        return logits
