"""SAM-Med3D 3D ViT image encoder (windowed + global attention, decomposed relative position).

Tensor layout: volumes are channels-first ``(B, C, D, H, W)`` with spatial axes ``(z, y, x)``; inside
the transformer, tokens are channels-last ``(B, D, H, W, C)`` on the patch grid (``D = H = W =
img_size // patch_size``).

Two facts of the original SAM-Med3D code are reproduced exactly, because every released checkpoint was
trained with them (see ``shared/spec/dcm.md``, "Global-RoI expert"):

* **Relative-position quirk.** The 3D decomposed relative position puts all three terms on the key's
  *last* axis. For a query at ``(a, b, c)`` and a key at ``(d, e, f)`` in a cube of side ``n`` the added
  logit is ``q(a,b,c).R_d[a-f] + q(a,b,d).R_h[b-f] + q(a,b,e).R_w[e-f]`` with unscaled per-head query
  vectors ``q`` and ``R_x[k] = rel_pos_x[k + n - 1]``. The h / w terms read the query vector at other
  positions, including padded ones.
* **Window padding.** A windowed block zero-pads the *normed* tokens up to a multiple of the window size
  (an 8^3 grid with window 14 becomes one 14^3 window); padded tokens have ``q = k = v = qkv.bias``,
  take part in every softmax, and their outputs are dropped.

Two exact computations of the windowed attention are provided:

* ``attention="padded"``: the reference; pads, partitions and attends over all ``n^3`` tokens.
* ``attention="fast"`` (default): attends over the real tokens of each window plus one *virtual key*
  with value ``bias_v`` whose logit is the log-sum-exp of all padded keys' logits. All padded keys share
  ``k = bias_k``, so their mass factorises over the key axes (see :func:`fast_window_attention`). Exact
  up to rounding (about 1e-6 in float32, 1e-14 in float64).

**Reduced precision** (bfloat16 / float16 autocast, or a half-precision model): the projections and the
attention matmuls run in that dtype, but the relative-position logits, the virtual key's log-mass (the fold
of the padding) and the softmax are accumulated in float32 (:func:`reduced_window_attention`; on the CPU
through ``F.scaled_dot_product_attention`` with a float32 mask, whose kernel accumulates in float32); the
global blocks take the same path (a cube without padding). The padded reference computes its attention core
in float32 on the reduced-precision projections. Float32 and float64 inputs run exactly the code above.
"""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from dcm.models.sam_med3d.common import LayerNorm3d, MLPBlock

__all__ = [
    "ATTENTION_MODES",
    "ImageEncoderViT3D",
    "Block3D",
    "Attention3D",
    "PatchEmbed3D",
    "get_rel_pos",
    "rel_pos_bias_reference",
    "fast_window_attention",
    "reduced_window_attention",
    "window_partition3d",
    "window_unpartition3d",
]

#: Names accepted by the ``attention`` option.
ATTENTION_MODES = ("fast", "padded")


def _rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """``rel_pos`` (L, C) as the ``2 * size - 1`` rows a cube of side ``size`` reads (linearly resized when
    ``L`` differs)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    return rel_pos


def get_rel_pos(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position table for a cube side ``size``.

    Args:
        size: number of positions along the axis (query and key alike).
        rel_pos: (L, C) learned table; linearly resized to ``2 * size - 1`` rows when ``L`` differs.

    Returns:
        (size, size, C) tensor ``R`` with ``R[i, j] = rel_pos[i - j + size - 1]``.
    """
    rel_pos = _rel_pos_table(size, rel_pos)
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


def _rel_pos_terms(q: torch.Tensor, bias_q: torch.Tensor, rel_pos_d: torch.Tensor, rel_pos_h: torch.Tensor,
                   rel_pos_w: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three relative-position terms of the quirk, from one product of the query rows with the tables.

    Args:
        q: (BH, Nd, Nh, Nw, C) unscaled queries of the real tokens.
        bias_q: (BH, C) the padded positions' query (each query row (a, b) is extended with it to ``n``).
        rel_pos_d, rel_pos_h, rel_pos_w: (L, C) tables (resized to ``2n - 1`` rows when ``L`` differs).
        n: window side.

    Returns:
        ``a_t`` (BH, Nd, Nh, Nw, n_f) ``= q(a,b,c).R_d[a-f]``, ``b_t`` (BH, Nd, Nh, n_d, n_f) ``=
        q(a,b,d).R_h[b-f]``, ``c_t`` (BH, Nd, Nh, n_e, n_f) ``= q(a,b,e).R_w[e-f]``, in the dtype of ``q``.
        Every query row is multiplied with each table's ``2n - 1`` rows once and the terms are gathered
        from that product (the per-axis einsums over (n, n, C) tables cost twice as much on a CPU).
    """
    bh, nd, nh, nw, c = q.shape
    length = 2 * n - 1
    q_row = q
    if nw < n:
        q_row = torch.cat([q, bias_q.to(q.dtype)[:, None, None, None, :].expand(bh, nd, nh, n - nw, c)], dim=3)
    tables = torch.cat([_rel_pos_table(n, t.to(q.dtype)) for t in (rel_pos_d, rel_pos_h, rel_pos_w)])
    prod = (q_row.reshape(-1, c) @ tables.t()).view(bh, nd, nh, n, 3, length)
    f = torch.arange(n, device=q.device)

    def rows(count: int) -> torch.Tensor:  # rel_pos[i - f + n - 1] for i < count: (count, n)
        return torch.arange(count, device=q.device)[:, None] - f + (n - 1)

    a_t = prod[:, :, :, :nw, 0].gather(-1, rows(nd).view(1, nd, 1, 1, n).expand(bh, nd, nh, nw, n))
    b_t = prod[:, :, :, :, 1].gather(-1, rows(nh).view(1, 1, nh, 1, n).expand(bh, nd, nh, n, n))
    c_t = prod[:, :, :, :, 2].gather(-1, rows(n).view(1, 1, 1, n, n).expand(bh, nd, nh, n, n))
    return a_t, b_t, c_t


def rel_pos_bias_reference(
    q: torch.Tensor, rel_pos_d: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, n: int
) -> torch.Tensor:
    """The SAM-Med3D relative-position logits over a full cube, written as a plain broadcast.

    Args:
        q: (BH, n^3, C) unscaled per-head queries of every position of the cube (padding included).
        rel_pos_d, rel_pos_h, rel_pos_w: (2n-1, C) tables.
        n: cube side.

    Returns:
        (BH, n, n, n, n, n, n) logits indexed ``[., a, b, c, d, e, f]`` (query (a,b,c), key (d,e,f)).
    """
    bh, _, c = q.shape
    rq = q.reshape(bh, n, n, n, c)
    rd, rh, rw = get_rel_pos(n, rel_pos_d), get_rel_pos(n, rel_pos_h), get_rel_pos(n, rel_pos_w)
    # t_x[., a, b, t, f]: query row (a, b), position t on that row, key index f on the last axis.
    t_d = torch.einsum("xabtc,afc->xabtf", rq, rd)  # q(a,b,t).R_d[a-f]
    t_h = torch.einsum("xabtc,bfc->xabtf", rq, rh)  # q(a,b,t).R_h[b-f]
    t_w = torch.einsum("xabtc,tfc->xabtf", rq, rw)  # q(a,b,t).R_w[t-f]
    # d-term: t = query c, broadcast over key d, e. h-term: t = key d. w-term: t = key e.
    return (
        t_d[:, :, :, :, None, None, :]
        + t_h[:, :, :, None, :, None, :]
        + t_w[:, :, :, None, None, :, :]
    )


def _padded_keys_lse(a_t: torch.Tensor, b_t: torch.Tensor, c_t: torch.Tensor, nd: int, nh: int, nw: int,
                     n: int) -> torch.Tensor:
    """logsumexp over the padded keys of the relative-position terms (the virtual key's fold), shape
    (BH, Nd, Nh, Nw).

    The padded keys split by which axis leaves the (Nd, Nh, Nw) grid first: ``f >= Nw`` (d, e free),
    ``f < Nw, d >= Nd`` (e free), ``f < Nw, d < Nd, e >= Nh``. For each key index ``f`` the row terms sum to
    ``W(f) = SB(f) SC(f)`` for ``f >= Nw`` and ``SB_hi(f) SC(f) + SB_lo(f) SC_hi(f)`` below (``SB`` the sum of
    ``exp B`` over d, ``hi`` / ``lo`` over d >= Nd / d < Nd, ``SC`` likewise over e), all taken in log
    space; the result is ``logsumexp_f (A(f) + log W(f))``.
    """
    lse_b = torch.logsumexp(b_t, dim=3)  # (BH, Nd, Nh, n_f)
    lse_c = torch.logsumexp(c_t, dim=3)
    log_w = lse_b + lse_c
    if nd < n or nh < n:
        below: List[torch.Tensor] = []
        if nd < n:
            below.append(torch.logsumexp(b_t[:, :, :, nd:, :nw], dim=3) + lse_c[..., :nw])
        if nh < n:
            below.append(torch.logsumexp(b_t[:, :, :, :nd, :nw], dim=3)
                         + torch.logsumexp(c_t[:, :, :, nh:, :nw], dim=3))
        low = below[0] if len(below) == 1 else torch.logaddexp(below[0], below[1])
        log_w = torch.cat([low, log_w[..., nw:]], dim=-1)
        return torch.logsumexp(a_t + log_w[:, :, :, None, :], dim=-1)
    return torch.logsumexp(a_t[..., nw:] + log_w[:, :, :, None, nw:], dim=-1)  # only f >= Nw is padded


def fast_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_q: torch.Tensor,
    bias_k: torch.Tensor,
    bias_v: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    n: int,
    scale: float,
) -> torch.Tensor:
    """Exact attention of the real tokens of a zero-padded window, without materialising the padding.

    The window is a cube of side ``n`` whose real tokens occupy the corner ``[0, Nd) x [0, Nh) x [0, Nw)``
    (axes z, y, x); every other (padded) position has ``q = bias_q``, ``k = bias_k``, ``v = bias_v``.
    For a real query the padded keys' total softmax mass is
    ``exp(scale q.bias_k) * sum_{(d,e,f) padded} exp(A(f) + B(d,f) + C(e,f))`` with the three
    relative-position terms ``A(f) = q(a,b,c).R_d[a-f]``, ``B(d,f) = q(a,b,d).R_h[b-f]``,
    ``C(e,f) = q(a,b,e).R_w[e-f]`` (``q`` at a padded position is ``bias_q``). The padded set splits into
    the disjoint parts ``{f >= Nw}``, ``{f < Nw, d >= Nd}``, ``{f < Nw, d < Nd, e >= Nh}``, each a sum of
    products of per-axis sums, evaluated in log space. The result is attention over the real keys plus
    one virtual key with that log-mass and value ``bias_v``. With no padding (``Nd = Nh = Nw = n``) it
    is plain attention with the relative-position terms.

    Args:
        q, k, v: (BH, Nd, Nh, Nw, C) per-head projections of the real tokens (q unscaled).
        bias_q, bias_k, bias_v: (BH, C) per-head projection biases (the padded tokens' q, k, v).
        rel_pos_d, rel_pos_h, rel_pos_w: (2n-1, C) tables.
        n: window side (``Nd, Nh, Nw <= n``).
        scale: logit scale (``C ** -0.5``).

    Returns:
        (BH, Nd, Nh, Nw, C) attention output at the real positions (before the output projection).
    """
    bh, nd, nh, nw, c = q.shape
    if max(nd, nh, nw) > n:
        raise ValueError(f"tokens {(nd, nh, nw)} do not fit a window of side {n}")
    a_t, b_t, c_t = _rel_pos_terms(q, bias_q, rel_pos_d, rel_pos_h, rel_pos_w, n)

    nq = nd * nh * nw
    logits = (q * scale).reshape(bh, nq, c) @ k.reshape(bh, nq, c).transpose(1, 2)
    logits = (
        logits.view(bh, nd, nh, nw, nd, nh, nw)
        + a_t[:, :, :, :, None, None, :nw]
        + b_t[:, :, :, None, :nd, None, :nw]
        + c_t[:, :, :, None, None, :nh, :nw]
    ).reshape(bh, nq, nq)

    if (nd, nh, nw) == (n, n, n):
        return torch.softmax(logits, dim=-1).matmul(v.reshape(bh, nq, c)).view(bh, nd, nh, nw, c)

    k0 = scale * torch.einsum("xabcz,xz->xabc", q, bias_k)
    virtual = (k0 + _padded_keys_lse(a_t, b_t, c_t, nd, nh, nw, n)).reshape(bh, nq, 1)

    probs = torch.softmax(torch.cat([logits, virtual], dim=-1), dim=-1)
    out = probs[:, :, :nq].matmul(v.reshape(bh, nq, c)) + probs[:, :, nq:] * bias_v[:, None, :]
    return out.view(bh, nd, nh, nw, c)


#: dtypes that take the reduced-precision attention (:func:`reduced_window_attention`).
REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def reduced_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_q: torch.Tensor,
    bias_k: torch.Tensor,
    bias_v: torch.Tensor,
    rel_pos_d: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    n: int,
    scale: float,
    use_sdpa: Optional[bool] = None,
) -> torch.Tensor:
    """:func:`fast_window_attention` for reduced-precision ``q``, ``k``, ``v`` (bfloat16 / float16).

    ``q @ k^T`` and ``probs @ v`` run in the inputs' dtype; the relative-position logits ``A + B + C``, the
    virtual key's log-mass (the log-sum-exp over the padded keys, from the float32 ``bias_q``) and the
    softmax are float32. The logits of the real keys and of the virtual key form one float32 additive mask
    over ``n_real + 1`` keys (the virtual key is ``bias_k`` with value ``bias_v``, so its ``scale * q.bias_k``
    comes from the matmul).

    Args:
        see :func:`fast_window_attention` (the biases in any float dtype).
        use_sdpa: ``F.scaled_dot_product_attention`` (default on the CPU, whose fused kernel accumulates the
            softmax in float32 and never stores the probabilities); False: an explicit float32 softmax.

    Returns:
        (BH, Nd, Nh, Nw, C) in the dtype of ``v``.
    """
    bh, nd, nh, nw, c = q.shape
    if max(nd, nh, nw) > n:
        raise ValueError(f"tokens {(nd, nh, nw)} do not fit a window of side {n}")
    nq = nd * nh * nw
    padded = (nd, nh, nw) != (n, n, n)
    with _no_autocast(q.device):
        q32 = q.float()
        a_t, b_t, c_t = _rel_pos_terms(q32, bias_q, rel_pos_d, rel_pos_h, rel_pos_w, n)

        mask = q32.new_empty(bh, nq, nq + int(padded))
        bc = b_t[:, :, :, :nd, None, :nw] + c_t[:, :, :, None, :nh, :nw]  # (BH, Nd, Nh, Nd, Nh, Nw): keys
        torch.add(a_t[:, :, :, :, None, None, :nw], bc[:, :, :, None],
                  out=mask[:, :, :nq].view(bh, nd, nh, nw, nd, nh, nw))
        keys, values = k.reshape(bh, nq, c), v.reshape(bh, nq, c)
        if padded:
            mask[:, :, nq] = _padded_keys_lse(a_t, b_t, c_t, nd, nh, nw, n).reshape(bh, nq)
            keys = torch.cat([keys, bias_k.to(k.dtype)[:, None, :]], dim=1)
            values = torch.cat([values, bias_v.to(v.dtype)[:, None, :]], dim=1)
        if use_sdpa is None:
            use_sdpa = q.device.type == "cpu"
        if use_sdpa:
            out = F.scaled_dot_product_attention(q.reshape(bh, 1, nq, c), keys[:, None], values[:, None],
                                                 attn_mask=mask[:, None], scale=scale)[:, 0]
        else:
            logits = ((q * scale).reshape(bh, nq, c) @ keys.transpose(1, 2)).float() + mask
            out = torch.softmax(logits, dim=-1).to(values.dtype) @ values
    return out.reshape(bh, nd, nh, nw, c).to(v.dtype)


class Attention3D(nn.Module):
    """Multi-head self-attention with the SAM-Med3D decomposed relative position.

    Parameters: ``rel_pos_d/h/w`` (2 * input_size - 1, head_dim), ``qkv`` (Linear dim -> 3 dim, with bias),
    ``proj`` (Linear dim -> dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        input_size: Optional[Tuple[int, int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required with relative positions")
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[2] - 1, self.head_dim))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, d, h, w, dim) -> q, k, v each (B * heads, d, h, w, head_dim); index ``b * heads + head``."""
        b, d, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, d, h, w, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(4, 0, 5, 1, 2, 3, 6).reshape(3, b * self.num_heads, d, h, w, self.head_dim)
        return qkv[0], qkv[1], qkv[2]

    def _merge(self, out: torch.Tensor, b: int) -> torch.Tensor:
        """(B * heads, d, h, w, head_dim) -> projected (B, d, h, w, dim)."""
        _, d, h, w, c = out.shape
        out = out.view(b, self.num_heads, d, h, w, c).permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, -1)
        return self.proj(out)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain attention over every token of a cube (padding, if any, already in ``x``).

        Args:
            x: (B, n, n, n, dim) tokens, axes (z, y, x).

        Returns:
            (B, n, n, n, dim).
        """
        b, d, h, w, _ = x.shape
        if self.use_rel_pos and not d == h == w:
            raise ValueError(f"relative positions need a cubic token block, got {(d, h, w)}")
        q, k, v = self._split(x)
        bh, nt = q.shape[0], d * h * w
        q, k, v = q.reshape(bh, nt, -1), k.reshape(bh, nt, -1), v.reshape(bh, nt, -1)
        if q.dtype in REDUCED_DTYPES:  # the attention core in float32 on the reduced-precision projections
            with _no_autocast(x.device):
                out = self._reference_core(q.float(), k.float(), v.float(), d, h, w).to(v.dtype)
        else:
            out = self._reference_core(q, k, v, d, h, w)
        return self._merge(out.view(bh, d, h, w, -1), b)

    def _reference_core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        d: int, h: int, w: int) -> torch.Tensor:
        """softmax(scale q k^T + relative position) v for (BH, d h w, C) q, k, v of a whole cube."""
        bh, nt = q.shape[0], d * h * w
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rel = rel_pos_bias_reference(q, self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, d)
            attn = (attn.view(bh, d, h, w, d, h, w) + rel).view(bh, nt, nt)
        return attn.softmax(dim=-1) @ v

    def forward_fast(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Attention of real tokens occupying the corner of a zero-padded cube of side ``n``.

        Args:
            x: (B, Nd, Nh, Nw, dim) real tokens, ``Nd, Nh, Nw <= n``, axes (z, y, x).
            n: side of the (virtually) padded window.

        Returns:
            (B, Nd, Nh, Nw, dim), equal to :meth:`forward_reference` on the zero-padded cube, cropped.
        """
        if not self.use_rel_pos:
            raise ValueError("the fast path is implemented for relative-position attention only")
        b = x.shape[0]
        q, k, v = self._split(x)
        reduced = q.dtype in REDUCED_DTYPES  # keep the float32 biases for the float32 fold
        if self.qkv.bias is not None:
            bias = self.qkv.bias.view(3, self.num_heads, self.head_dim)
            bias = bias if reduced else bias.to(q.dtype)
        else:
            bias = q.new_zeros(3, self.num_heads, self.head_dim)
        bias = bias.repeat(1, b, 1)  # (3, B * heads, head_dim)
        attend = reduced_window_attention if reduced else fast_window_attention
        out = attend(q, k, v, bias[0], bias[1], bias[2], self.rel_pos_d, self.rel_pos_h, self.rel_pos_w, n, self.scale)
        return self._merge(out, b)

    def forward(self, x: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
        """Attention over ``x`` (B, d, h, w, dim) -> (B, d, h, w, dim).

        ``n`` None or equal to the block's side: plain attention; otherwise ``x`` is the real corner of a
        zero-padded cube of side ``n`` and the exact fast path is used.
        """
        d, h, w = x.shape[1:4]
        if self.use_rel_pos and _reduced_precision(x) and (n is not None or d == h == w):
            return self.forward_fast(x, d if n is None else n)  # float32 logits and softmax, fused on the CPU
        if n is None or (d, h, w) == (n, n, n) or not self.use_rel_pos:
            if n is not None and (d, h, w) != (n, n, n):
                pad = (0, 0, 0, n - w, 0, n - h, 0, n - d)
                return self.forward_reference(F.pad(x, pad))[:, :d, :h, :w]
            return self.forward_reference(x)
        return self.forward_fast(x, n)


def _reduced_precision(x: torch.Tensor) -> bool:
    """Whether the projections of ``x`` come out in reduced precision (autocast on, or a half model)."""
    return x.dtype in REDUCED_DTYPES or torch.is_autocast_enabled(x.device.type)


def window_partition3d(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Zero-pad ``x`` (B, D, H, W, C) to multiples of ``window_size`` and cut it into windows.

    Returns:
        windows (B * nW, ws, ws, ws, C) in (z, y, x) window order, and the padded size (Dp, Hp, Wp).
    """
    b, d, h, w, c = x.shape
    ws = window_size
    pd, ph, pw = (-d) % ws, (-h) % ws, (-w) % ws
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c)
    return windows, (dp, hp, wp)


def window_unpartition3d(
    windows: torch.Tensor, window_size: int, padded: Tuple[int, int, int], size: Tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition3d`: windows -> (B, D, H, W, C), padding dropped."""
    dp, hp, wp = padded
    d, h, w = size
    ws = window_size
    nwin = (dp // ws) * (hp // ws) * (wp // ws)
    b = windows.shape[0] // nwin
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w].contiguous()


def _axis_segments(size: int, ws: int) -> List[Tuple[int, int, int, int]]:
    """Groups of equal windows along one axis: (start, stop, extent of real tokens, count)."""
    full, rest = divmod(size, ws)
    segs = []
    if full:
        segs.append((0, full * ws, ws, full))
    if rest:
        segs.append((full * ws, size, rest, 1))
    return segs


class Block3D(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.

    ``window_size > 0``: attention inside windows of that side (zero padding of the normed tokens);
    ``0``: global attention. Tokens (B, D, H, W, dim), axes (z, y, x).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int, int]] = None,
        attention: str = "fast",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        attn_size = input_size if window_size == 0 else (window_size, window_size, window_size)
        self.attn = Attention3D(dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos,
                                input_size=attn_size)
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention

    def _windowed_padded(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[1:4])
        windows, padded = window_partition3d(x, self.window_size)
        windows = self.attn.forward_reference(windows)
        return window_unpartition3d(windows, self.window_size, padded, size)

    def _windowed_fast(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        ws = self.window_size
        out = torch.empty_like(x)
        for (d0, d1, ed, cd), (h0, h1, eh, ch), (w0, w1, ew, cw) in itertools.product(
            _axis_segments(d, ws), _axis_segments(h, ws), _axis_segments(w, ws)
        ):
            region = x[:, d0:d1, h0:h1, w0:w1]
            win = region.reshape(b, cd, ed, ch, eh, cw, ew, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
            win = win.reshape(b * cd * ch * cw, ed, eh, ew, c)
            res = self.attn(win, ws)
            res = res.view(b, cd, ch, cw, ed, eh, ew, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
            out[:, d0:d1, h0:h1, w0:w1] = res.reshape(b, d1 - d0, h1 - h0, w1 - w0, c)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, dim) -> (B, D, H, W, dim)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            if self.attention == "padded":
                x = self._windowed_padded(x)
            else:
                x = self._windowed_fast(x)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Non-overlapping patch embedding: (B, C_in, D, H, W) -> (B, D/p, H/p, W/p, dim) channels-last."""

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """SAM-Med3D ViT image encoder.

    ``forward(image)``: image (B, in_chans, S, S, S) with ``S = img_size`` (axes z, y, x) ->
    embedding (B, out_chans, g, g, g), ``g = img_size // patch_size``.

    State-dict layout (SAM-Med3D): ``pos_embed`` (1, g, g, g, dim), ``patch_embed.proj``, ``blocks.i.*``,
    ``neck.{0,1,2,3}`` (Conv3d 1x1 no bias, LayerNorm3d, Conv3d 3x3x3 no bias, LayerNorm3d).
    """

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 8,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        act_layer: Type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        attention: str = "fast",
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))

        def norm_layer(dim: int) -> nn.Module:
            return nn.LayerNorm(dim, eps=norm_eps)

        self.blocks = nn.ModuleList(
            Block3D(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid, grid),
                attention=attention,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    @property
    def attention(self) -> str:
        """The windowed-attention computation, ``"fast"`` or ``"padded"`` (settable)."""
        return self.blocks[0].attention if len(self.blocks) else "fast"

    @attention.setter
    def attention(self, mode: str) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
        for blk in self.blocks:
            blk.attention = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, S, S, S) image -> (B, out_chans, g, g, g) embedding (axes z, y, x)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
