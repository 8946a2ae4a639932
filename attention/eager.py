"""The ``torch`` backend's fast path: the variants of METHOD.md §2 without the reference's T×T temporaries.

:func:`eager_attention` computes the same output as :func:`gravprobe.attention.reference_attention` (checked
against the loop transcription of METHOD.md §2 in ``tests/test_attention.py``) with fewer passes over the
``[B, H, T, T]`` score matrix, which is what a CPU training step of the small study models spends its
attention time on (``benchmarks/RESULTS.md``, "CPU training speed"):

- ``softmax`` and ``ssmax`` run on ``F.scaled_dot_product_attention`` (ssmax's per-row factor
  ``c ln n_i`` is folded into the queries; a window is a boolean mask).
- ``softplus``, ``lssa`` and ``lssar`` run as custom autograd Functions with hand-written backward
  passes. The mask enters as an additive ``-inf`` bias inside one ``baddbmm`` (``softplus(-inf) = 0`` and
  ``sigmoid(-inf) = 0`` then mask the weights and the gradients for free); the output is
  ``(e @ v) / z`` (the normalised weights are never formed); the backward's ``g_i . v_j - o_i . g_i`` is
  one ``baddbmm``; ``lssa``'s length scale ``ln d ln n_i`` and the QK-normalisation act on ``[B, T, H, D]``
  queries and keys (plain autograd) before the Function.
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


def _scores(qs: torch.Tensor, ks: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[N, T, T]`` = ``bias + qs @ ks^T`` for ``[N, T, D]`` inputs (one gemm, the mask fused in)."""
    if bias is None:
        return torch.bmm(qs, ks.transpose(1, 2))
    return torch.baddbmm(bias, qs, ks.transpose(1, 2))


#: Elements of one ``[chunk, T, T]`` score block: the batch is processed in chunks of at most this many
#: score elements (at least one sequence), so memory stays bounded at long T. Smaller chunks that fit the
#: L2 cache were measured slower (the backward recomputes each block): ``benchmarks/RESULTS.md``.
CHUNK_ELEMENTS = 1 << 22


def _chunks(N: int, T: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // (T * T))
    return [slice(i, min(i + step, N)) for i in range(0, N, step)]


def _grad_rows(g: torch.Tensor, out: torch.Tensor, v: torch.Tensor, total: torch.Tensor,
               factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``out_i = sum_j w_ij v_j / W_i``: ``dL/dw_ij * factor`` ``[N, T, T]`` (one ``baddbmm``) and
    ``g / W`` ``[N, T, Dv]`` (for ``dv = w^T (g / W)``)."""
    gz = g / total
    delta = (gz * out).sum(-1, keepdim=True)                       # [N, T, 1]: o_i . g_i / W_i
    return torch.baddbmm(delta, gz, v.transpose(1, 2), beta=-factor, alpha=factor), gz


def _pow(u: torch.Tensor, p: float) -> torch.Tensor:
    """``u ** p`` for ``u >= 0`` as a new tensor: by repeated squaring for integer ``0 <= p <= 64`` (exact to
    rounding and faster than ``pow`` on the CPU, whose ``-inf``/0 paths are slow), else ``torch.pow``."""
    if p != int(p) or not 0 <= p <= 64:
        return u.pow(p)
    e = int(p)
    result: torch.Tensor | None = None
    base = u
    while e:
        if e & 1:
            result = base.clone() if result is None else result.mul_(base)
        e >>= 1
        if e:
            base = base * base
    return torch.ones_like(u) if result is None else result


def _prep(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor | float, norm: bool):
    """Scaled queries ``qs = c q^`` and keys ``ks = k^`` (``^`` = divided by ``max(|x|, eps)`` when ``norm``,
    else ``qs = c q``, ``ks = k``) and what :func:`_chain` needs to take gradients back to ``q``, ``k``."""
    if not norm:
        return q * c, k, ()
    nq, nk = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    rq, rk = 1.0 / nq.clamp_min(_NORM_EPS), 1.0 / nk.clamp_min(_NORM_EPS)
    qn, kn = q * rq, k * rk
    return qn * c, kn, (qn, rq, (nq >= _NORM_EPS).to(q.dtype), rk, (nk >= _NORM_EPS).to(k.dtype))


def _chain(dqs: torch.Tensor, dks: torch.Tensor, ks: torch.Tensor, c: torch.Tensor | float,
           saved: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``q``, ``k`` from those of ``qs``, ``ks`` (:func:`_prep`): for ``x^ = x / |x|``,
    ``dx = (g - x^ (x^ . g)) / |x|`` (and ``g / eps`` where the norm was clamped)."""
    dq = dqs * c
    if not saved:
        return dq, dks
    qn, rq, okq, rk, okk = saved
    dq = (dq - qn * ((qn * dq).sum(-1, keepdim=True) * okq)) * rq
    dk = (dks - ks * ((ks * dks).sum(-1, keepdim=True) * okk)) * rk
    return dq, dk


def _softplus_weights(s: torch.Tensor) -> torch.Tensor:
    """``softplus(s)``, 0 where ``s = -inf`` (masked)."""
    return F.softplus(s)


class _SoftplusRows(torch.autograd.Function):
    """``out = (e @ v) / z`` with ``e = softplus(qs ks^T + bias)``, ``z_i = sum_j e_ij``; ``[N, T, D]``.

    Processed in batch chunks (:data:`CHUNK_ELEMENTS`); the ``[N, T, T]`` blocks are not kept for the
    backward, which recomputes them chunk by chunk (as flash attention does). Backward:
    ``ds_ij = (g_i . v_j - out_i . g_i) / z_i * sigmoid(s_ij)``, ``dqs = ds ks``, ``dks = ds^T qs``,
    ``dv = e^T (g / z)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, c, norm):
        qs, ks, saved = _prep(q, k, c, norm)
        N, T, _ = qs.shape
        out = qs.new_empty(N, T, v.shape[-1])
        z = qs.new_empty(N, T, 1)
        chunks = _chunks(N, T)
        kept = []
        for sl in chunks:
            s = _scores(qs[sl], ks[sl], bias)
            e = _softplus_weights(s)
            torch.sum(e, -1, keepdim=True, out=z[sl])
            torch.bmm(e, v[sl], out=out[sl]).div_(z[sl])
            if len(chunks) == 1:              # one block: keep it rather than recompute it
                kept = [e, torch.sigmoid_(s)]
        ctx.save_for_backward(qs, ks, v, bias, z, out, *saved, *kept)
        ctx.c, ctx.n_saved = c, len(saved)
        return out

    @staticmethod
    def backward(ctx, g):
        qs, ks, v, bias, z, out, *rest = ctx.saved_tensors
        saved, kept = rest[:ctx.n_saved], rest[ctx.n_saved:]
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(v)
        for sl in _chunks(qs.shape[0], qs.shape[1]):
            if kept:
                e, sig = kept
            else:
                s = _scores(qs[sl], ks[sl], bias)
                e, sig = _softplus_weights(s), torch.sigmoid_(s)
            ds, gz = _grad_rows(g[sl], out[sl], v[sl], z[sl])
            ds.mul_(sig)
            torch.bmm(ds, ks[sl], out=dq[sl])
            torch.bmm(ds.transpose(1, 2), qs[sl], out=dk[sl])
            torch.bmm(e.transpose(1, 2), gz, out=dv[sl])
        return (*_chain(dq, dk, ks, ctx.c, tuple(saved)), dv, None, None, None)


def _softplus_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   c: torch.Tensor | float, norm: bool) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SoftplusRows.apply(q, k, v, bias, c, norm)
    qs, ks, _ = _prep(q, k, c, norm)
    return _softplus_forward(qs, ks, v, bias)


def _softplus_forward(qs, ks, v, bias):
    N, T, _ = qs.shape
    out = qs.new_empty(N, T, v.shape[-1])
    for sl in _chunks(N, T):
        e = _softplus_weights(_scores(qs[sl], ks[sl], bias))
        torch.bmm(e, v[sl], out=out[sl]).div_(e.sum(-1, keepdim=True))
    return out


def _lssar_stats(s: torch.Tensor, n: torch.Tensor, o: torch.Tensor):
    """Per-row constants of lssar from scores ``s`` ``[N, T, T]``: ``e = softplus(s)``, ``z``, ``alpha``,
    ``beta`` (``u = ReLU(alpha_i e_ij - beta_i)``) and the uniform-row flag."""
    e = _softplus_weights(s)
    z = e.sum(-1, keepdim=True)
    # m_i = max_j ReLU(n_i a_ij - o_i) = ReLU(n_i softplus(max_j s_ij) / z_i - o_i) (softplus is monotone);
    # u = ReLU(n_i a_ij - o_i) / m_i = ReLU(alpha_i e_ij - beta_i): every term <= 1 (overflow-safe power)
    m = torch.relu(n * F.softplus(s.amax(-1, keepdim=True)) / z - o)
    uniform = m <= 0
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
    w = up1 * u
    if total is None:
        total = w.sum(-1, keepdim=True)
        uniform = uniform | (total <= 0)
    any_uniform = torch.compiler.is_compiling() or bool(uniform.any())
    if any_uniform:
        w = torch.where(uniform, visible.to(w.dtype), w)
        total = torch.where(uniform, n.expand_as(total), total)
    return w, up1, total, uniform


class _LssarRows(torch.autograd.Function):
    """lssar on ``[N, T, D]`` normalised-and-scaled queries ``qs`` and keys ``ks``, in batch chunks.

    With ``u = ReLU(alpha_i e_ij - beta_i)``, ``alpha_i = n_i / (z_i m_i)``, ``beta_i = o_i / m_i`` (``m_i``
    constant: the output does not depend on it), ``w = u^p``, ``out_i = sum_j w_ij v_j / W_i``:
    ``du = dw p u^(p-1) [u > 0]``, ``dz_i = -(alpha_i / z_i) sum_j du_ij e_ij``,
    ``ds_ij = (du_ij alpha_i + dz_i) sigmoid(s_ij)``; ``dv = w^T (g / W)``. The backward recomputes the
    ``[chunk, T, T]`` blocks from the saved per-row constants.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, c, n, o, p, visible):
        qs, ks, saved = _prep(q, k, c, True)
        out, stats, kept = _lssar_forward(qs, ks, v, bias, n, o, p, visible, keep=True)
        ctx.save_for_backward(qs, ks, v, bias, n, visible, out, *stats, *saved, *kept)
        ctx.p, ctx.c = p, c
        return out

    @staticmethod
    def backward(ctx, g):
        qs, ks, v, bias, n, visible, out, z, alpha, beta, uniform, total, *rest = ctx.saved_tensors
        saved, kept = rest[:5], rest[5:]
        p = ctx.p
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(v)
        for sl in _chunks(qs.shape[0], qs.shape[1]):
            if kept:
                e, sig, w, up1 = kept
            else:
                s = _scores(qs[sl], ks[sl], bias)
                e = _softplus_weights(s)
                w, up1, _, _ = _lssar_weights(e, alpha[sl], beta[sl], uniform[sl], n, p, visible, total[sl])
                sig = torch.sigmoid_(s)
            du, gz = _grad_rows(g[sl], out[sl], v[sl], total[sl], factor=p)       # p dL/dw
            du.mul_(up1)          # p u^(p-1): 0 where u = 0 for p > 1, so ReLU's mask comes for free
            if p <= 1.0:
                du.mul_(w > 0)
            if torch.compiler.is_compiling() or bool(uniform[sl].any()):
                du.masked_fill_(uniform[sl], 0.0)     # a uniform row's weights do not depend on the scores
            a = alpha[sl]
            dz = (du * e).sum(-1, keepdim=True).mul_(-a / z[sl])
            ds = torch.addcmul(dz, du, a).mul_(sig)
            torch.bmm(ds, ks[sl], out=dq[sl])
            torch.bmm(ds.transpose(1, 2), qs[sl], out=dk[sl])
            torch.bmm(w.transpose(1, 2), gz, out=dv[sl])
        return (*_chain(dq, dk, ks, ctx.c, tuple(saved)), dv, None, None, None, None, None, None)


def _lssar_forward(qs, ks, v, bias, n, o, p, visible, keep=False):
    """lssar forward in batch chunks; with ``keep`` also the per-row constants the backward needs."""
    N, T, _ = qs.shape
    out = qs.new_empty(N, T, v.shape[-1])
    stats = [qs.new_empty(N, T, 1) for _ in range(3)] + [torch.empty(N, T, 1, dtype=torch.bool)] + \
        [qs.new_empty(N, T, 1)] if keep else None
    chunks = _chunks(N, T)
    kept: list[torch.Tensor] = []
    for sl in chunks:
        s = _scores(qs[sl], ks[sl], bias)
        e, z, alpha, beta, uniform = _lssar_stats(s, n, o)
        w, up1, total, uniform = _lssar_weights(e, alpha, beta, uniform, n, p, visible)
        torch.bmm(w, v[sl], out=out[sl]).div_(total)
        if keep:
            for dst, src in zip(stats, (z, alpha, beta, uniform, total)):
                dst[sl] = src
            if len(chunks) == 1:              # one block: keep it rather than recompute it
                kept = [e, torch.sigmoid_(s), w, up1]
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
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    if variant == "softplus":
        out = _softplus_rows(qh, kh, vh, bias, 1.0 / math.sqrt(D), False)
    else:
        ln_b = math.log(p["log_base"])
        c = (math.log(D) / ln_b) * (torch.log(n) / ln_b)                 # [T, 1]: log d log n_i
        if variant == "lssa":
            out = _softplus_rows(qh, kh, vh, bias, c, True)
        else:
            o = torch.where(n <= p["offset_until"], torch.zeros_like(n), torch.full_like(n, p["offset"]))
            visible = _visible(T, causal, q.device, window)
            args = (qh, kh, vh, bias, c, n, o, p["sharpen_power"], visible)
            if torch.is_grad_enabled() and (qh.requires_grad or kh.requires_grad or vh.requires_grad):
                out = _LssarRows.apply(*args)
            else:
                qs, ks, _ = _prep(qh, kh, c, True)
                out = _lssar_forward(qs, ks, vh, bias, n, o, p["sharpen_power"], visible)[0]
    return out.view(B, H, T, -1).transpose(1, 2).to(out_dtype)
