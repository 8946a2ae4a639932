"""The ``torch`` backend's fast path: the variants of METHOD.md §2 without the reference's T×T temporaries.

:func:`eager_attention` computes the same output as :func:`gravprobe.attention.reference_attention` (checked
against the loop transcription of METHOD.md §2 in ``tests/test_attention.py``) with fewer passes over the
``[B, H, T, T]`` score matrix, which is what a CPU training step of the small study models spends its
attention time on (``benchmarks/RESULTS.md``, "CPU training speed"):

- ``softmax`` and ``ssmax`` run on ``F.scaled_dot_product_attention`` (ssmax's per-row factor
  ``c ln n_i`` is folded into the queries; a window is a boolean mask).
- ``softplus``, ``lssa`` and ``lssar`` run as custom autograd Functions with hand-written backward
  passes. A causal score matrix is computed in :data:`ROW_BLOCKS` blocks of query rows, each only over the
  keys its rows can see (the masked upper triangle is mostly skipped: 2/3 of the elements and gemm flops
  at T = 100). The mask enters as an additive ``-inf`` bias (``softplus(-inf) = 0`` and ``sigmoid(-inf) =
  0`` then mask the weights and the gradients for free), fused into the ``baddbmm`` of the diagonal block
  and added to the masked columns only elsewhere; the output is ``(e @ v) / z`` (the normalised weights
  are never formed); the backward's ``g_i . v_j - o_i . g_i`` is one ``baddbmm``; the QK-normalisation
  and ``lssa``'s length scale ``ln d ln n_i`` act on the ``[N, T, D]`` queries and keys inside the
  Function (one pass each way, chain rule by hand).
- every other variant of the registry (``relu`` and ``sigmoid``: not used for training; any new one) runs
  the reference.

Conventions, dtypes and parameters are those of :mod:`gravprobe.attention.reference` (float16/bfloat16
computed in float32, returned in the input dtype; ``window`` causal only).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .reference import (
    _NORM_EPS,
    UNIFORM_ROW_RTOL,
    _check_qkv,
    _compute_dtype,
    _reference,
    _row_lengths,
    _ssmax_scale,
    _visible,
    check_window,
    resolve_params,
)

__all__ = ["FAST_VARIANTS", "eager_attention"]

#: Variants with a fast path here; every other variant of the registry runs the reference.
FAST_VARIANTS: tuple[str, ...] = ("softmax", "softplus", "lssa", "lssar", "ssmax")


def _bias(T: int, causal: bool, window: int | None, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor | None:
    """``[T, T]`` additive mask: 0 where key ``j`` is visible from query ``i``, ``-inf`` elsewhere; None
    when every key is visible (non-causal)."""
    if not causal:
        return None
    visible = _visible(T, causal, device, window)
    return torch.zeros(T, T, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def _scores(qs: torch.Tensor, ks: torch.Tensor, bias: torch.Tensor | None,
            blk: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Scores of the row block ``blk`` (:func:`_blocks`) from ``qs`` rows ``r0:r1`` and ``ks`` rows
    ``c0:c1`` (``[N, R, D]``, ``[N, C, D]``): ``[N, R, C]`` = ``bias + qs @ ks^T``, the ``[T, T]`` additive
    mask ``bias`` fused into the gemm, or, when only the keys from ``m0`` on are masked, added to those
    columns alone. The result's storage is padded with zeros to a multiple of :data:`_LANES` elements: see
    :func:`_softplus`."""
    r0, r1, c0, c1, m0 = blk
    N, R, C = qs.shape[0], qs.shape[1], ks.shape[1]
    pad = 0 if torch.compiler.is_compiling() else -(N * R * C) % _LANES
    out = None
    if pad:
        flat = qs.new_empty(N * R * C + pad)
        flat[N * R * C:].zero_()
        out = flat[:N * R * C].view(N, R, C)
    if bias is None or m0 > c0:
        s = torch.bmm(qs, ks.transpose(1, 2), out=out)
        if bias is not None:
            s[:, :, m0 - c0:].add_(bias[r0:r1, m0:c1])
        return s
    return torch.baddbmm(bias[r0:r1, c0:c1], qs, ks.transpose(1, 2), out=out)


#: Vectorised elementwise kernels run their last ``numel % (2 * vector width)`` elements through the scalar
#: code, whose ``softplus`` can differ from the vector code's in the last bit; for the identical keys of a
#: (near-)uniform lssar row that noise decides the row (``tests/test_attention.py``, identical keys).
#: Softplus therefore runs over the score storage padded to a multiple of this, so that every score takes
#: the vector path (the study's blocks need no padding: 128 sequences).
_LANES = 64


def _softplus(s: torch.Tensor) -> torch.Tensor:
    """``softplus(s)`` (0 where ``s = -inf``, masked) for ``s`` from :func:`_scores`, over its padded storage."""
    base = None if torch.compiler.is_compiling() else s._base
    if base is None or base.numel() == s.numel() or not s.is_contiguous():
        return F.softplus(s)
    return F.softplus(base)[:s.numel()].view(s.shape)


#: Elements of one ``[chunk, T, T]`` score block: the batch is processed in chunks of at most this many
#: score elements (at least one sequence), so memory stays bounded at long T; with one chunk the blocks are
#: kept for the backward. Smaller chunks that fit the L2 cache were measured slower (the backward
#: recomputes each block): ``benchmarks/RESULTS.md``.
CHUNK_ELEMENTS = 1 << 22

#: Causal row blocks: with a causal mask (or a window) the ``[T, T]`` scores are computed in this many
#: blocks of query rows, block ``r0:r1`` only over the keys ``c0:r1`` its rows can see, so most of the
#: masked upper triangle (and, with a window, the keys left of it) is never computed: 3 blocks do 2/3 of
#: the score elements and gemm flops at T = 100 (``benchmarks/RESULTS.md``, issue 13 §2, session 3).
ROW_BLOCKS = 3


def _chunks(N: int, T: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // (T * T))
    return [slice(i, min(i + step, N)) for i in range(0, N, step)]


def _blocks(T: int, causal: bool, window: int | None) -> tuple[tuple[int, int, int, int, int], ...]:
    """``(r0, r1, c0, c1, m0)``: query rows ``r0:r1`` see (some of) the keys ``c0:c1`` and no other; the keys
    ``c0:m0`` are visible from every one of these rows."""
    if not causal:
        return ((0, T, 0, T, 0),)
    nb = max(1, min(ROW_BLOCKS, T))
    edges = [round(i * T / nb) for i in range(nb + 1)]
    return tuple((r0, r1, c0, r1, r0 if window is None else c0)
                 for r0, r1 in zip(edges, edges[1:]) if r1 > r0
                 for c0 in [0 if window is None else max(0, r0 - window + 1)])


def _div_into(dst: torch.Tensor, x: torch.Tensor, d: torch.Tensor) -> None:
    """``dst[...] = x / d`` for a strided slice ``dst`` (one pass; compiled graphs take no strided ``out=``)."""
    if torch.compiler.is_compiling():
        dst.copy_(x.div_(d))
    else:
        torch.div(x, d, out=dst)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a_..d b_..d`` of two ``[N, R, D]`` tensors as ``[N, R, 1]``: einsum (a batched gemv) for
    contiguous inputs, ``vecdot`` for strided ones (einsum would copy them first)."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.einsum("nrd,nrd->nr", a, b).unsqueeze(-1)
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def _pow(u: torch.Tensor, p: float) -> torch.Tensor:
    """``u ** p`` for ``u >= 0`` as a new tensor: by squaring in place, left to right over the bits of integer
    ``0 <= p <= 64`` (exact to rounding, one new tensor, and faster than ``pow`` on the CPU, whose ``-inf``/0
    paths are slow), else ``torch.pow``."""
    if p != int(p) or not 0 <= p <= 64:
        return u.pow(p)
    e = int(p)
    if e == 0:
        return torch.ones_like(u)
    if e == 1:
        return u.clone()
    bits = bin(e)[3:]                                # after the leading 1
    result = u * u if bits[0] == "0" else torch.mul(u, u).mul_(u)
    for b in bits[1:]:
        result.mul_(result)
        if b == "1":
            result.mul_(u)
    return result


def _prep(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor | float, norm: bool):
    """Scaled queries ``qs = c q^`` and keys ``ks = k^`` (``^`` = divided by ``max(|x|, eps)`` when ``norm``,
    else ``qs = c q``, ``ks = k``) and what :func:`_chain` needs to take gradients back to ``q``, ``k``:
    one pass over each of ``q`` and ``k`` for the norms and one for each scaled copy."""
    if not norm:
        return q * c, k, ()
    nq = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
    nk = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
    rq, rk = 1.0 / nq.clamp_min(_NORM_EPS), 1.0 / nk.clamp_min(_NORM_EPS)
    return q * (rq * c), k * rk, (rq, (nq >= _NORM_EPS).to(q.dtype), rk, (nk >= _NORM_EPS).to(k.dtype))


def _chain(dqs: torch.Tensor, dks: torch.Tensor, q: torch.Tensor, ks: torch.Tensor, c: torch.Tensor | float,
           saved: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``q``, ``k`` from those of ``qs``, ``ks`` (:func:`_prep`): for ``x^ = x / |x|``,
    ``dx = (g - x^ (x^ . g)) / |x|`` (and ``g / eps`` where the norm was clamped). With ``qs = c rq q``:
    ``dq = c rq dqs - q (c rq^3 (q . dqs) ok)``, ``dk = rk dks - ks (rk (ks . dks) ok)`` (``ks = rk k``)."""
    if not saved:
        return dqs.mul_(c), dks
    rq, okq, rk, okk = saved
    a = rq * c
    cq, ck = _rowdot(q, dqs).mul_(a * rq * rq * okq), _rowdot(ks, dks).mul_(rk * okk)
    return dqs.mul_(a).addcmul_(q, cq, value=-1.0), dks.mul_(rk).addcmul_(ks, ck, value=-1.0)


class _Grads:
    """``dqs = ds ks``, ``dks = ds^T qs``, ``dv = w^T gz`` summed over the row blocks and batch chunks: each
    block's products are plain ``bmm``s into fresh tensors (an in-place ``baddbmm_`` into a strided slice
    falls back to one ``addmm_`` per sequence); the row blocks of ``dqs`` are concatenated, the key ranges of
    ``dks`` and ``dv`` added up (a block over every key is taken as it is)."""

    def __init__(self, qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor) -> None:
        self.qs, self.ks, self.v = qs, ks, v
        self.dq: list[list[torch.Tensor]] = []
        self.dk: list[torch.Tensor | None] = []
        self.dv: list[torch.Tensor | None] = []
        self.sl: slice | None = None

    def _acc(self, acc: list, i: int, like: torch.Tensor, sl: slice, c0: int, c1: int, x: torch.Tensor):
        if acc[i] is None:
            if c0 == 0 and c1 == like.shape[1]:
                acc[i] = x
                return
            acc[i] = like.new_zeros(x.shape[0], like.shape[1], x.shape[2])
        acc[i][:, c0:c1].add_(x)

    def add(self, sl: slice, blk: tuple[int, int, int, int], ds: torch.Tensor, w: torch.Tensor,
            gz: torch.Tensor) -> None:
        r0, r1, c0, c1, _ = blk
        if sl != self.sl:
            self.sl = sl
            self.dq.append([])
            self.dk.append(None)
            self.dv.append(None)
        self.dq[-1].append(torch.bmm(ds, self.ks[sl, c0:c1]))
        self._acc(self.dk, -1, self.ks, sl, c0, c1, torch.bmm(ds.transpose(1, 2), self.qs[sl, r0:r1]))
        self._acc(self.dv, -1, self.v, sl, c0, c1, torch.bmm(w.transpose(1, 2), gz))

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dq = [x[0] if len(x) == 1 else torch.cat(x[::-1], 1) for x in self.dq]
        if len(dq) == 1:
            return dq[0], self.dk[0], self.dv[0]
        return torch.cat(dq), torch.cat(self.dk), torch.cat(self.dv)


class _SoftplusRows(torch.autograd.Function):
    """``out = (e @ v) / z`` with ``e = softplus(qs ks^T + bias)``, ``z_i = sum_j e_ij``; ``[N, T, D]``.

    Computed per causal row block (:func:`_blocks`) and batch chunk (:data:`CHUNK_ELEMENTS`). With one batch
    chunk the blocks ``e`` and ``sigmoid(s)`` are kept for the backward (the buffer of ``s`` becomes
    ``sigmoid(s)``); with several the backward recomputes them chunk by chunk (as flash attention does).
    Backward: ``ds_ij = (g_i . v_j - out_i . g_i) / z_i * sigmoid(s_ij)``, ``dqs = ds ks``,
    ``dks = ds^T qs``, ``dv = e^T (g / z)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, c, norm, blocks):
        qs, ks, saved = _prep(q, k, c, norm)
        N, T, _ = qs.shape
        out = qs.new_empty(N, T, v.shape[-1])
        z = qs.new_empty(N, T, 1)
        chunks = _chunks(N, T)
        kept = []
        for sl in chunks:
            for blk in blocks:
                r0, r1, c0, c1, _ = blk
                s = _scores(qs[sl, r0:r1], ks[sl, c0:c1], bias, blk)
                e = _softplus(s)
                zb = torch.sum(e, -1, keepdim=True)
                z[sl, r0:r1] = zb
                _div_into(out[sl, r0:r1], torch.bmm(e, v[sl, c0:c1]), zb)
                if len(chunks) == 1:              # one chunk: keep the blocks rather than recompute them
                    kept += [e, s.sigmoid_()]
        ctx.save_for_backward(q, qs, ks, v, bias, z, out, *saved, *kept)
        ctx.c, ctx.n_saved, ctx.blocks = c, len(saved), blocks
        return out

    @staticmethod
    def backward(ctx, g):
        q, qs, ks, v, bias, z, out, *rest = ctx.saved_tensors
        saved, kept = rest[:ctx.n_saved], rest[ctx.n_saved:]
        gz = g / z
        delta = _rowdot(gz, out)                                        # o_i . g_i / z_i
        grads = _Grads(qs, ks, v)
        for sl in _chunks(qs.shape[0], qs.shape[1]):
            for b in reversed(range(len(ctx.blocks))):     # the block over every key first (see _Grads)
                blk = ctx.blocks[b]
                r0, r1, c0, c1, _ = blk
                if kept:
                    e, sig = kept[2 * b], kept[2 * b + 1]
                else:
                    s = _scores(qs[sl, r0:r1], ks[sl, c0:c1], bias, blk)
                    e, sig = _softplus(s), s.sigmoid_()
                gzb, kb = gz[sl, r0:r1], ks[sl, c0:c1]
                ds = torch.baddbmm(delta[sl, r0:r1], gzb, v[sl, c0:c1].transpose(1, 2), beta=-1.0).mul_(sig)
                grads.add(sl, blk, ds, e, gzb)
        dq, dk, dv = grads.result()
        return (*_chain(dq, dk, q, ks, ctx.c, tuple(saved)), dv, None, None, None, None)


def _softplus_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   c: torch.Tensor | float, norm: bool, blocks) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SoftplusRows.apply(q, k, v, bias, c, norm, blocks)
    qs, ks, _ = _prep(q, k, c, norm)
    return _softplus_forward(qs, ks, v, bias, blocks)


def _softplus_forward(qs, ks, v, bias, blocks):
    N, T, _ = qs.shape
    out = qs.new_empty(N, T, v.shape[-1])
    for sl in _chunks(N, T):
        for blk in blocks:
            r0, r1, c0, c1, _ = blk
            e = _softplus(_scores(qs[sl, r0:r1], ks[sl, c0:c1], bias, blk))
            _div_into(out[sl, r0:r1], torch.bmm(e, v[sl, c0:c1]), e.sum(-1, keepdim=True))
    return out


def _lssar_stats(s: torch.Tensor, n: torch.Tensor, o: torch.Tensor):
    """Per-row constants of lssar from scores ``s`` ``[N, R, C]`` (rows with their ``n``, ``o`` ``[R, 1]``):
    ``e = softplus(s)``, ``z``, ``alpha``, ``beta`` (``u = ReLU(alpha_i e_ij - beta_i)``) and the
    uniform-row flag."""
    e = _softplus(s)
    z = e.sum(-1, keepdim=True)
    # m_i = max_j ReLU(n_i a_ij - o_i) = ReLU(n_i softplus(max_j s_ij) / z_i - o_i) (softplus is monotone);
    # u = ReLU(n_i a_ij - o_i) / m_i = ReLU(alpha_i e_ij - beta_i): every term <= 1 (overflow-safe power)
    m = torch.relu(n * F.softplus(s.amax(-1, keepdim=True)) / z - o)
    uniform = m <= UNIFORM_ROW_RTOL * o                   # within rounding of uniform: the reference's rule
    m_safe = torch.where(uniform, torch.ones_like(m), m)
    alpha = torch.where(uniform, torch.zeros_like(m), n / (z * m_safe))
    beta = torch.where(uniform, torch.zeros_like(m), o / m_safe)
    return e, z, alpha, beta, uniform


def _lssar_weights(e, alpha, beta, uniform, n, p, visible, total=None):
    """``w = u^p`` (and ``u^(p-1)``), with the uniform-row limit (reference.py): ``w = visible``, ``W = n``;
    returns ``w, u^(p-1), W`` and the uniform-row flags. Without ``total`` (forward) a row whose every ``w``
    is 0 although ``m_i > 0`` also takes the limit: its ``m_i`` was rounding noise (a near-uniform row,
    e.g. identical keys), where the reference's own row maximum gives a uniform row too. The limit is rare,
    so it is skipped when no row is uniform (eager); a compiled graph cannot branch on data and always
    applies it."""
    u = torch.addcmul(-beta, e, alpha).clamp_min_(0.0)
    up1 = _pow(u, p - 1.0)
    w = u.mul_(up1)                                   # u is not needed after this
    if total is None:
        total = w.sum(-1, keepdim=True)
        uniform = uniform | (total <= 0)
    any_uniform = torch.compiler.is_compiling() or bool(uniform.any())
    if any_uniform:
        w = torch.where(uniform, visible.to(w.dtype), w)
        total = torch.where(uniform, n.expand_as(total), total)
    return w, up1, total, uniform


class _LssarRows(torch.autograd.Function):
    """lssar on ``[N, T, D]`` normalised-and-scaled queries ``qs`` and keys ``ks``, per causal row block and
    batch chunk.

    With ``u = ReLU(alpha_i e_ij - beta_i)``, ``alpha_i = n_i / (z_i m_i)``, ``beta_i = o_i / m_i`` (``m_i``
    constant: the output does not depend on it), ``w = u^p``, ``out_i = sum_j w_ij v_j / W_i``:
    ``du = dw p u^(p-1) [u > 0]``, ``dz_i = -(alpha_i / z_i) sum_j du_ij e_ij``,
    ``ds_ij = (du_ij alpha_i + dz_i) sigmoid(s_ij)``; ``dv = w^T (g / W)``. With one batch chunk the blocks
    are kept; with several the backward recomputes them from the saved per-row constants.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, c, n, o, p, visible, blocks):
        qs, ks, saved = _prep(q, k, c, True)
        out, stats, kept = _lssar_forward(qs, ks, v, bias, n, o, p, visible, blocks, keep=True)
        ctx.save_for_backward(q, qs, ks, v, bias, n, visible, out, *stats, *saved, *kept)
        ctx.p, ctx.c, ctx.blocks = p, c, blocks
        return out

    @staticmethod
    def backward(ctx, g):
        q, qs, ks, v, bias, n, visible, out, z, alpha, beta, uniform, total, *rest = ctx.saved_tensors
        saved, kept = rest[:4], rest[4:]
        p = ctx.p
        gz = g / total
        delta = _rowdot(gz, out).mul_(p)                                 # p o_i . g_i / W_i
        grads = _Grads(qs, ks, v)
        for sl in _chunks(qs.shape[0], qs.shape[1]):
            for b in reversed(range(len(ctx.blocks))):     # the block over every key first (see _Grads)
                blk = ctx.blocks[b]
                r0, r1, c0, c1, _ = blk
                rows = slice(r0, r1)
                uni = uniform[sl, rows]
                if kept:
                    e, sig, w, up1 = kept[4 * b:4 * b + 4]
                else:
                    s = _scores(qs[sl, rows], ks[sl, c0:c1], bias, blk)
                    e = _softplus(s)
                    w, up1, _, _ = _lssar_weights(e, alpha[sl, rows], beta[sl, rows], uni, n[rows], p,
                                                  visible[rows, c0:c1], total[sl, rows])
                    sig = s.sigmoid_()
                gzb, kb = gz[sl, rows], ks[sl, c0:c1]
                # p dL/dw times p u^(p-1): 0 where u = 0 for p > 1, so ReLU's mask comes for free
                du = torch.baddbmm(delta[sl, rows], gzb, v[sl, c0:c1].transpose(1, 2), beta=-1.0, alpha=p)
                du.mul_(up1)
                if p <= 1.0:
                    du.mul_(w > 0)
                if torch.compiler.is_compiling() or bool(uni.any()):
                    du.masked_fill_(uni, 0.0)     # a uniform row's weights do not depend on the scores
                a = alpha[sl, rows]
                dz = _rowdot(du, e).mul_(-a / z[sl, rows])
                ds = torch.addcmul(dz, du, a, out=du).mul_(sig)
                grads.add(sl, blk, ds, w, gzb)
        dq, dk, dv = grads.result()
        return (*_chain(dq, dk, q, ks, ctx.c, tuple(saved)), dv, None, None, None, None, None, None, None)


def _lssar_forward(qs, ks, v, bias, n, o, p, visible, blocks, keep=False):
    """lssar forward per row block and batch chunk; with ``keep`` also the per-row constants the backward
    needs (and, with one chunk, the blocks)."""
    N, T, _ = qs.shape
    out = qs.new_empty(N, T, v.shape[-1])
    stats = [qs.new_empty(N, T, 1) for _ in range(3)] + [torch.empty(N, T, 1, dtype=torch.bool)] + \
        [qs.new_empty(N, T, 1)] if keep else None
    chunks = _chunks(N, T)
    kept: list[torch.Tensor] = []
    for sl in chunks:
        for blk in blocks:
            r0, r1, c0, c1, _ = blk
            s = _scores(qs[sl, r0:r1], ks[sl, c0:c1], bias, blk)
            e, z, alpha, beta, uniform = _lssar_stats(s, n[r0:r1], o[r0:r1])
            w, up1, total, uniform = _lssar_weights(e, alpha, beta, uniform, n[r0:r1], p, visible[r0:r1, c0:c1])
            _div_into(out[sl, r0:r1], torch.bmm(w, v[sl, c0:c1]), total)
            if keep:
                for dst, src in zip(stats, (z, alpha, beta, uniform, total)):
                    dst[sl, r0:r1] = src
                if len(chunks) == 1:              # one chunk: keep the blocks rather than recompute them
                    kept += [e, s.sigmoid_(), w, up1]
    return out, stats, kept


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B*H, T, D]``."""
    B, T, H, D = x.shape
    return x.transpose(1, 2).reshape(B * H, T, D)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, *, causal: bool = True,
                    window: int | None = None, **params: Any) -> torch.Tensor:
    """Attention of METHOD.md §2 like :func:`gravprobe.attention.reference_attention`, faster on the CPU.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; ``variant``, ``causal``, ``window`` and ``params``
            as in :func:`gravprobe.attention.attention_weights`.
    Returns:
        ``[B, T, H, Dv]`` in the dtype of ``v`` (computed in float32 for half types, else as given).
        Differentiable in q, k, v (and a tensor ``ssmax_scale``).
    """
    _check_qkv(q, k, v)
    return _eager(q, k, v, variant, causal, check_window(window, causal), resolve_params(variant, params))


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, causal: bool, window: int | None,
           p: dict[str, Any]) -> torch.Tensor:
    """:func:`eager_attention` for checked inputs, a checked window and resolved params ``p``
    (:func:`gravprobe.attention.resolve_params`): what :func:`gravprobe.attention.attend` calls."""
    if variant not in FAST_VARIANTS:
        return _reference(q, k, v, variant, causal, window, p)
    B, T, H, D = q.shape
    dtype = _compute_dtype(q.dtype)
    out_dtype = v.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if variant in ("softmax", "ssmax"):
        mask = None
        if causal and window is not None and window < T:
            mask = _visible(T, causal, q.device, window)
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if variant == "ssmax":
            c = _ssmax_scale(p["ssmax_scale"], H, dtype, q.device)
            ln_n = torch.log(_row_lengths(T, causal, dtype, q.device, window)) / math.log(p["log_base"])
            qh = qh * (c * ln_n)
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=1.0 / math.sqrt(D),
                                           is_causal=causal and mask is None)
        return y.transpose(1, 2).to(out_dtype)
    n = _row_lengths(T, causal, dtype, q.device, window)                 # [T, 1]
    bias = _bias(T, causal, window, dtype, q.device)
    blocks = _blocks(T, causal, window)
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    if variant == "softplus":
        out = _softplus_rows(qh, kh, vh, bias, 1.0 / math.sqrt(D), False, blocks)
    else:
        ln_b = math.log(p["log_base"])
        c = (math.log(D) / ln_b) * (torch.log(n) / ln_b)                 # [T, 1]: log d log n_i
        if variant == "lssa":
            out = _softplus_rows(qh, kh, vh, bias, c, True, blocks)
        else:
            o = torch.where(n <= p["offset_until"], torch.zeros_like(n), torch.full_like(n, p["offset"]))
            visible = _visible(T, causal, q.device, window)
            args = (qh, kh, vh, bias, c, n, o, p["sharpen_power"], visible, blocks)
            if torch.is_grad_enabled() and (qh.requires_grad or kh.requires_grad or vh.requires_grad):
                out = _LssarRows.apply(*args)
            else:
                qs, ks, _ = _prep(qh, kh, c, True)
                out = _lssar_forward(qs, ks, vh, bias, n, o, p["sharpen_power"], visible, blocks)[0]
    return out.view(B, H, T, -1).transpose(1, 2).to(out_dtype)
