"""Launchers, autograd and ``torch.library`` custom-op registration for the two-stage attention kernels.

Supported: see the header of ``triton_attention.py`` (variants ``softplus``, ``lssa``, ``lssar``; causal or
not; any T ≥ 1; head dim ≤ 128; fp16/bf16/fp32). Tested with Triton 3.9.0 / torch 2.13 in interpreter mode
on CPU only; the GPU launch configuration below is an untuned guess until the ``gpu`` tests and the
benchmark have run on a GPU.

Structure
    ``fused_attention`` (public, via ``gravprobe.kernels``) validates, computes the inverse q/k norms for
    ``lssa``/``lssar`` in PyTorch (autograd differentiates them; the kernels return their gradient), then
    calls the custom op
    ``gravprobe::two_stage_attention`` whose backward is the custom op
    ``gravprobe::two_stage_attention_backward``. Both have fake (meta) implementations, so
    ``torch.compile(fullgraph=True)`` traces through without a graph break. On torch without
    ``torch.library.custom_op`` (< 2.4) the same launchers run through ``TwoStageAttention``
    (a ``torch.autograd.Function``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import triton

from gravprobe.attention.reference import REGISTRY

from . import SUPPORTED_VARIANTS
from . import triton_attention as _k

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128
#: The parameters of the supported variants (``fused_attention`` ignores the ones irrelevant to a given
#: variant), with their checks and defaults: read from the registry, which states them once.
_PARAMS = {p.name: p for v in SUPPORTED_VARIANTS for p in REGISTRY[v].params}
#: parameter names ``fused_attention`` accepts, with their defaults (the registry's)
PARAM_DEFAULTS = {name: p.default for name, p in _PARAMS.items()}
#: Fill freshly allocated outputs with NaN so an element a kernel forgot to write cannot pass a test.
#: On by default in interpreter mode (tests), off on GPUs (costs a memset).
POISON_OUTPUTS = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Tests may force (BLOCK_M, BLOCK_N) to exercise more block boundaries.
BLOCK_OVERRIDE: tuple[int, int] | None = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LIB = "gravprobe"


@dataclass(frozen=True)
class _Cfg:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _config(head_dim: int, backward: bool) -> _Cfg:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if BLOCK_OVERRIDE is not None:
        bm, bn = BLOCK_OVERRIDE
    elif _INTERPRET:
        bm, bn = 32, 32  # fewer, larger tiles are faster in the interpreter; still several blocks at T ≥ 33
    elif backward:
        bm, bn = (64, 64) if block_d <= 64 else (32, 64)
    else:
        bm, bn = (64, 64) if block_d <= 64 else (64, 32)
    return _Cfg(bm, bn, block_d, num_warps=4 if block_d <= 64 else 8, num_stages=2)


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _scalars(variant: str, head_dim: int, sharpen_power: float, offset: float, offset_until: int,
             log_base: float) -> dict:
    length_scale = variant in ("lssa", "lssar")
    return {
        "scale": 1.0 / math.sqrt(head_dim),
        "log_coef": math.log(head_dim) / math.log(log_base) ** 2 if length_scale else 0.0,
        "power": float(sharpen_power),
        "offset": float(offset),
        "offset_until": int(offset_until),
        "LENGTH_SCALE": length_scale,
        "LSSAR": variant == "lssar",
        # integer powers 1..63 compile to repeated squaring (one specialisation per power)
        "POWER_INT": _integer_power(sharpen_power) if variant == "lssar" else 0,
    }


def _integer_power(p: float) -> int:
    return int(p) if float(p).is_integer() and 1 <= p <= 63 else 0


def _precision(dtype: torch.dtype) -> str:
    # exact fp32 products for fp32 inputs (correctness first); fp16/bf16 products use tensor cores anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward_impl(q, k, v, q_scale, k_scale, variant, causal, sharpen_power, offset, offset_until, log_base):
    B, T, H, D = q.shape
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    norm = q_scale is not None
    out = _alloc((B, T, H, D), q.dtype, q.device)
    stat_s = _alloc((B, H, T), torch.float32, q.device)
    if variant == "lssar":
        stat_m = _alloc((B, H, T), torch.float32, q.device)
        stat_w = _alloc((B, H, T), torch.float32, q.device)
    else:  # not used by the kernels; empty placeholders keep one signature
        stat_m, stat_w = stat_s.new_empty((0,)), stat_s.new_empty((0,))  # outputs may not alias
    cfg = _config(D, backward=False)
    grid = (triton.cdiv(T, cfg.block_m), B * H)
    _k._fwd_kernel[grid](
        q, k, v, q_scale if norm else stat_s, k_scale if norm else stat_s, out, stat_s,
        stat_m if variant == "lssar" else stat_s, stat_w if variant == "lssar" else stat_s,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, T, D,
        **_scalars(variant, D, sharpen_power, offset, offset_until, log_base),
        CAUSAL=causal, NORM=norm, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        UPCAST=_INTERPRET, PRECISION=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, stat_s, stat_m, stat_w


def _backward_impl(grad_out, q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w, variant, causal,
                   sharpen_power, offset, offset_until, log_base):
    B, T, H, D = q.shape
    grad_out = _last_dim_contiguous(grad_out)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    norm = q_scale is not None
    lssar = variant == "lssar"
    # Dᵢ = dOᵢ·Oᵢ (= Σⱼ a′ᵢⱼ dOᵢ·vⱼ), float32 [B, H, T]: from the saved output in PyTorch, except for lssar,
    # whose dQ kernel recomputes it in float32 from the weights (p amplifies the rounding of Oᵢ)
    if lssar:
        stat_d = _alloc((B, H, T), torch.float32, q.device)
        stat_e = _alloc((B, H, T), torch.float32, q.device)
    else:
        stat_d = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
        stat_e = stat_d
    dq = _alloc((B, T, H, D), q.dtype, q.device)
    dk = _alloc((B, T, H, D), k.dtype, q.device)
    dv = _alloc((B, T, H, D), v.dtype, q.device)
    if norm:
        d_q_scale = _alloc((B, H, T), torch.float32, q.device)
        d_k_scale = _alloc((B, H, T), torch.float32, q.device)
    else:
        d_q_scale, d_k_scale = stat_d.new_empty((0,)), stat_d.new_empty((0,))
    dummy = stat_d  # any float32 pointer for arguments a constexpr branch never touches
    stats = (stat_s, stat_m if lssar else dummy, stat_w if lssar else dummy, stat_d, stat_e)
    scales = (q_scale if norm else dummy, k_scale if norm else dummy)
    scalars = _scalars(variant, D, sharpen_power, offset, offset_until, log_base)
    cfg = _config(D, backward=True)
    common = {"CAUSAL": causal, "NORM": norm, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": cfg.block_d,
                  "UPCAST": _INTERPRET, "PRECISION": _precision(q.dtype),
                  "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    # dQ first: for lssar it also writes the row statistic E that the dK/dV kernel reads
    _k._bwd_dq_kernel[(triton.cdiv(T, cfg.block_m), B * H)](
        q, k, v, *scales, grad_out, dq, d_q_scale if norm else dummy, *stats,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        H, T, D, **scalars, **common,
    )
    _k._bwd_dkv_kernel[(triton.cdiv(T, cfg.block_n), B * H)](
        q, k, v, *scales, grad_out, dk, dv, d_k_scale if norm else dummy, *stats,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        H, T, D, **scalars, **common,
    )
    return dq, dk, dv, d_q_scale, d_k_scale


# ---------------------------------------------------------------------------------------------------
# autograd: custom op (torch ≥ 2.4) or autograd.Function
# ---------------------------------------------------------------------------------------------------

_HAS_CUSTOM_OP = hasattr(torch.library, "custom_op")
_N_PARAMS = 6  # variant, causal, sharpen_power, offset, offset_until, log_base

if _HAS_CUSTOM_OP:

    @torch.library.custom_op(f"{_LIB}::two_stage_attention", mutates_args=())
    def _attention_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor | None,
        k_scale: torch.Tensor | None, variant: str, causal: bool, sharpen_power: float, offset: float,
        offset_until: int, log_base: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward: (out [B, T, H, D], S, M, W [B, H, T] float32; M, W empty unless lssar)."""
        return _forward_impl(q, k, v, q_scale, k_scale, variant, causal, sharpen_power, offset,
                             offset_until, log_base)

    @_attention_op.register_fake
    def _(q, k, v, q_scale, k_scale, variant, causal, sharpen_power, offset, offset_until, log_base):
        B, T, H, _D = q.shape
        stat = q.new_empty((B, H, T), dtype=torch.float32)
        extra = (B, H, T) if variant == "lssar" else (0,)
        return (torch.empty_like(q), stat, q.new_empty(extra, dtype=torch.float32),
                q.new_empty(extra, dtype=torch.float32))

    @torch.library.custom_op(f"{_LIB}::two_stage_attention_backward", mutates_args=())
    def _attention_backward_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        q_scale: torch.Tensor | None, k_scale: torch.Tensor | None, out: torch.Tensor,
        stat_s: torch.Tensor, stat_m: torch.Tensor, stat_w: torch.Tensor, variant: str, causal: bool,
        sharpen_power: float, offset: float, offset_until: int, log_base: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward: (dq, dk, dv [B, T, H, D], d q_scale, d k_scale [B, H, T] float32; empty without norm)."""
        return _backward_impl(grad_out, q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w, variant,
                              causal, sharpen_power, offset, offset_until, log_base)

    @_attention_backward_op.register_fake
    def _(grad_out, q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w, variant, causal,
          sharpen_power, offset, offset_until, log_base):
        B, T, H, _D = q.shape
        scale_shape = (B, H, T) if q_scale is not None else (0,)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                q.new_empty(scale_shape, dtype=torch.float32), q.new_empty(scale_shape, dtype=torch.float32))

    def _setup_context(ctx, inputs, output):
        q, k, v, q_scale, k_scale, *params = inputs
        out, stat_s, stat_m, stat_w = output
        ctx.has_norm = q_scale is not None
        ctx.save_for_backward(q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w)
        ctx.params = params
        ctx.mark_non_differentiable(stat_s, stat_m, stat_w)

    def _backward(ctx, grad_out, _gs, _gm, _gw):
        q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w = ctx.saved_tensors
        dq, dk, dv, dqs, dks = _attention_backward_op(grad_out.contiguous(), q, k, v, q_scale, k_scale, out,
                                                      stat_s, stat_m, stat_w, *ctx.params)
        if not ctx.has_norm:
            dqs = dks = None
        return (dq, dk, dv, dqs, dks) + (None,) * _N_PARAMS

    _attention_op.register_autograd(_backward, setup_context=_setup_context)


class TwoStageAttention(torch.autograd.Function):
    """Autograd function over the same launchers (used when ``torch.library.custom_op`` is missing)."""

    @staticmethod
    def forward(ctx, q, k, v, q_scale, k_scale, variant, causal, sharpen_power, offset, offset_until,
                log_base):
        out, stat_s, stat_m, stat_w = _forward_impl(q, k, v, q_scale, k_scale, variant, causal,
                                                    sharpen_power, offset, offset_until, log_base)
        ctx.has_norm = q_scale is not None
        ctx.save_for_backward(q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w)
        ctx.params = (variant, causal, sharpen_power, offset, offset_until, log_base)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_scale, k_scale, out, stat_s, stat_m, stat_w = ctx.saved_tensors
        dq, dk, dv, dqs, dks = _backward_impl(grad_out.contiguous(), q, k, v, q_scale, k_scale, out, stat_s,
                                              stat_m, stat_w, *ctx.params)
        if not ctx.has_norm:
            dqs = dks = None
        return (dq, dk, dv, dqs, dks) + (None,) * _N_PARAMS


# ---------------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------------

def _inverse_norms(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """1 / max(‖x‖, eps) over the head dim (the reference's QK-normalisation), float32, ``[B, H, T]``.

    The kernels multiply the raw scores qᵢ·kⱼ by these, so q̂ and k̂ are never rounded to the input dtype;
    autograd carries the kernels' gradient for the inverse norms back through this function."""
    return x.float().norm(dim=-1).clamp_min(eps).reciprocal().transpose(1, 2).contiguous()


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str) -> None:
    """Raise a typed error naming the problem if the kernels cannot run these inputs."""
    if variant not in SUPPORTED_VARIANTS:
        raise ValueError(f"fused_attention: unknown variant {variant!r}; the kernels support "
                         f"{SUPPORTED_VARIANTS} (use gravprobe.attention.attend(..., backend='torch') "
                         f"for the others)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"fused_attention: {name} must be [B, T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"fused_attention: {name} has dtype {t.dtype}; supported are {SUPPORTED_DTYPES} "
                            f"(use the PyTorch reference for float64)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"fused_attention: q, k, v must have the same shape [B, T, H, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError("fused_attention: q, k, v must share dtype and device")
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        raise ValueError(f"fused_attention: head dim {q.shape[-1]} unsupported (1..{MAX_HEAD_DIM})")
    if q.shape[1] < 1:
        raise ValueError("fused_attention: sequence length T must be ≥ 1")
    if q.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError("fused_attention: tensors are on the CPU and TRITON_INTERPRET=1 was not set before "
                           "gravprobe.kernels was first used; move them to CUDA or use the PyTorch reference")


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, causal: bool = True,
                    **params) -> torch.Tensor:
    """Fused two-stage attention (METHOD.md §2) with Triton forward and backward kernels.

    Args:
        q, k, v: ``[B, T, H, D]`` (batch, time, heads, head dim), fp16/bf16/fp32, same dtype and device.
        variant: one of ``SUPPORTED_VARIANTS``.
        causal: keys j ≤ i with nᵢ = i (1-based); otherwise all keys with nᵢ = T.
        **params: ``sharpen_power`` p (> 0), ``offset`` o, ``offset_until`` (oᵢ = 0 for 1-based
            i ≤ offset_until), ``log_base`` of the length scale; defaults and checks are the registry's
            (``gravprobe.attention.reference.REGISTRY``: p = 15, o = 1, 3, e); ``softplus`` scores use 1/√D.
            Names irrelevant to the variant are ignored; unknown names raise TypeError, bad values
            ValueError.

    Returns:
        ``[B, T, H, D]`` in the input dtype.
    """
    unknown = set(params) - set(PARAM_DEFAULTS)
    if unknown:
        raise TypeError(f"fused_attention: unknown parameter(s) {sorted(unknown)}; valid: {sorted(PARAM_DEFAULTS)}")
    check_inputs(q, k, v, variant)
    try:  # the registry's checks (sharpen_power > 0, log_base > 0 and != 1 or 'e', ...), defaults filled in
        p = {name: _PARAMS[name].check(params[name]) if name in params else default
             for name, default in PARAM_DEFAULTS.items()}
    except ValueError as exc:
        raise ValueError(f"fused_attention: {exc}") from None
    q_scale = k_scale = None
    if variant in ("lssa", "lssar"):
        q_scale, k_scale = _inverse_norms(q), _inverse_norms(k)
    args = (variant, bool(causal), float(p["sharpen_power"]), float(p["offset"]), int(p["offset_until"]),
            float(p["log_base"]))
    if _HAS_CUSTOM_OP:
        return _attention_op(q, k, v, q_scale, k_scale, *args)[0]
    return TwoStageAttention.apply(q, k, v, q_scale, k_scale, *args)
