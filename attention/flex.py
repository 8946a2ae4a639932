"""The ``flex`` backend: METHOD.md §2 variants as PyTorch FlexAttention score modifications.

Every row-normalised variant here is a softmax over a modified score, so FlexAttention (fused Triton
kernels on CUDA, forward and backward; a compiled or unfused forward on the CPU) computes it without the
``[B, H, T, T]`` matrix:

- ``softmax``: ``s_ij = q_i . k_j / sqrt(d)``, no modification.
- ``softplus``: ``softplus(s)/sum softplus(s) = softmax(log softplus(s))``.
- ``lssa``: the same over ``s_ij = log d log n_i (q^_i . k^_j)``; the queries are normalised and scaled by
  their row's ``log d log n_i`` before the call (``scale=1``), the keys normalised.
- ``lssar``: pass 1 is ``lssa`` with its log-sum-exp ``lse_i = log z_i``; pass 2 is a softmax over
  ``p log ReLU(n_i softplus(s_ij) exp(-lse_i) - o_i)`` (``w/sum w = softmax(log w)``; the softmax's
  own row maximum makes the power overflow-safe). Rows whose every ``w`` is 0 (pass 2 returns
  ``lse = -inf``) take the uniform-row limit of ``reference.py``, the mean of the visible values.

The causal mask and a window ``W`` (keys ``i - W < j <= i``) are a block mask, cached per
``(T, W, device)``. ``log softplus`` is evaluated as ``s`` below ``s = -20`` (where
``log softplus(s) = s + O(e^s)``), so a very negative score keeps a finite log-weight.

Gradients: on CUDA, FlexAttention's backward kernels; ``lssar``'s pass 2 captures ``lse`` of pass 1 as
a buffer, which FlexAttention differentiates only where it supports captured-buffer gradients — checked
by ``pytest -m gpu`` (``tests/test_attention_flex.py``) against the reference before ``auto`` may pick it.

Compilation: FlexAttention is fast only compiled. :func:`flex_attend` calls a ``torch.compile``-d
``flex_attention`` when :func:`use_compiled` says so (CUDA always; CPU unless ``GRAVPROBE_FLEX_COMPILE=0``),
else the unfused eager implementation (correct, memory-quadratic; what the CPU tests use). Compiled CPU
FlexAttention in torch 2.13 takes neither float64 nor ``return_lse`` (lssar's two passes): those calls run
unfused on the CPU too.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
import torch.nn.functional as F

from .reference import (
    _NORM_EPS,
    UNIFORM_ROW_RTOL,
    _check_qkv,
    _compute_dtype,
    _row_lengths,
    check_window,
    resolve_params,
)

__all__ = ["COMPILE_ENV", "FLEX_VARIANTS", "flex_attend", "flex_available", "flex_support", "use_compiled"]

#: Variants the flex backend implements.
FLEX_VARIANTS: tuple[str, ...] = ("softmax", "softplus", "lssa", "lssar")
#: ``0`` makes the CPU use the unfused eager FlexAttention (no compilation); ``1`` forces compilation.
COMPILE_ENV = "GRAVPROBE_FLEX_COMPILE"


@functools.lru_cache(maxsize=1)
def _flex_module() -> Any:
    from torch.nn.attention import flex_attention as fa

    return fa


def flex_available() -> bool:
    """Whether ``torch.nn.attention.flex_attention`` imports here."""
    try:
        _flex_module()
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False
    return True


def flex_support(q: torch.Tensor, variant: str, causal: bool, *, needs_grad: bool = False) -> tuple[bool, str]:
    """Whether the flex backend can run this call; ``(ok, reason)`` with the reason when not."""
    if not flex_available():
        return False, "torch.nn.attention.flex_attention does not import in this torch"
    if variant not in FLEX_VARIANTS:
        return False, f"the flex backend implements {', '.join(FLEX_VARIANTS)}, not {variant!r}"
    if needs_grad and not q.is_cuda:
        return False, "FlexAttention has no backward on the CPU (forward only: inference, probes, evaluation)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False, f"dtype {q.dtype} is not supported"
    return True, ""


def use_compiled(device: torch.device) -> bool:
    """Compiled FlexAttention on CUDA; on the CPU unless ``GRAVPROBE_FLEX_COMPILE=0``."""
    env = os.environ.get(COMPILE_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Any:
    # dynamic=None: the first shape compiles static, a second one compiles a dynamic-shape graph, so a
    # sweep over T (benchmarks, evaluation at 1x..16x the context) does not recompile per length.
    return torch.compile(_flex_module().flex_attention, dynamic=None)


@functools.lru_cache(maxsize=64)
def _block_mask(T: int, window: int | None, device: str) -> Any:
    fa = _flex_module()
    if window is None or window >= T:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    return fa.create_block_mask(mask_mod, None, None, T, T, device=device)


def _log_softplus(s: torch.Tensor) -> torch.Tensor:
    """``log softplus(s)``, equal to ``s`` to float precision below ``s = -20``, never ``-inf`` for finite s."""
    return torch.where(s < -20.0, s, torch.log(F.softplus(s)))


def _log_softplus_mod(score, b, h, q_idx, kv_idx):
    return _log_softplus(score)


def _call(q, k, v, score_mod, block_mask, scale, lse: bool):
    fa = _flex_module()
    # compiled CPU FlexAttention (torch 2.13) can neither return the log-sum-exp (lssar's passes) nor take
    # float64: those calls run the unfused implementation
    compiled = use_compiled(q.device) and (q.is_cuda or (not lse and q.dtype != torch.float64))
    fn = _compiled_flex() if compiled else fa.flex_attention
    aux = fa.AuxRequest(lse=True) if lse else None
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_aux=aux)
    if lse:
        out, aux_out = out
        return out, aux_out.lse
    return out, None


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, *, causal: bool = True,
                window: int | None = None, **params: Any) -> torch.Tensor:
    """Attention of METHOD.md §2 on FlexAttention (``softmax``, ``softplus``, ``lssa``, ``lssar``).

    Args:
        q, k, v: ``[B, T, H, D]`` (v may have its own head dim where FlexAttention allows it).
        variant, causal, window, params: as in :func:`gravprobe.attention.attention_weights`.
    Returns:
        ``[B, T, H, D]`` in the dtype of ``v``. Half types stay half on CUDA (FlexAttention accumulates
        in float32); float64 is computed as given.
    """
    _check_qkv(q, k, v)
    return _flex(q, k, v, variant, causal, check_window(window, causal), resolve_params(variant, params))


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, causal: bool, window: int | None,
          p: dict[str, Any]) -> torch.Tensor:
    """:func:`flex_attend` for checked inputs, a checked window and resolved params ``p``
    (:func:`gravprobe.attention.resolve_params`): what :func:`gravprobe.attention.attend` calls."""
    if variant not in FLEX_VARIANTS:
        raise ValueError(f"the flex backend implements {', '.join(FLEX_VARIANTS)}, not {variant!r}")
    T, D = q.shape[1], q.shape[3]
    out_dtype = v.dtype
    if not q.is_cuda:                       # CPU: float32/float64 like the reference
        dtype = _compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, T, D]
    block_mask = _block_mask(T, window, str(q.device)) if causal else None
    if variant == "softmax":
        out, _ = _call(qh, kh, vh, None, block_mask, 1.0 / math.sqrt(D), False)
        return out.transpose(1, 2).to(out_dtype)
    if variant == "softplus":
        out, _ = _call(qh, kh, vh, _log_softplus_mod, block_mask, 1.0 / math.sqrt(D), False)
        return out.transpose(1, 2).to(out_dtype)
    # lssa / lssar: q^ scaled by log d log n_i per row, k^; scale 1
    n = _row_lengths(T, causal, torch.float64 if q.dtype == torch.float64 else torch.float32, q.device,
                     window)[:, 0]                                                        # [T]
    ln_b = math.log(p["log_base"])
    c = (math.log(D) / ln_b) * (torch.log(n) / ln_b)
    qs = qh / qh.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS) * c.to(qh.dtype)[:, None]
    ks = kh / kh.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    if variant == "lssa":
        out, _ = _call(qs, ks, vh, _log_softplus_mod, block_mask, 1.0, False)
        return out.transpose(1, 2).to(out_dtype)
    _, lse1 = _call(qs, ks, vh, _log_softplus_mod, block_mask, 1.0, True)    # [B, H, T]: log z_i
    o = torch.where(n <= p["offset_until"], torch.zeros_like(n), torch.full_like(n, p["offset"]))
    power = p["sharpen_power"]

    tol = UNIFORM_ROW_RTOL * o                          # within rounding of uniform counts as 0 (reference.py)

    def sharpen(score, b, h, q_idx, kv_idx):
        r = n[q_idx] * F.softplus(score) * torch.exp(-lse1[b, h, q_idx]) - o[q_idx]
        return power * torch.log(torch.where(r > tol[q_idx], r, 0.0))   # log of w = ReLU(.)^p; -inf where w = 0

    out, lse2 = _call(qs, ks, vh, sharpen, block_mask, 1.0, True)
    uniform = ~torch.isfinite(lse2)                                            # [B, H, T]: every w = 0
    if bool(uniform.any()):
        flat, _ = _call(qs, ks, vh, _zero_mod, block_mask, 1.0, False)         # mean of the visible values
        out = torch.where(uniform[..., None], flat, out)
    return out.transpose(1, 2).to(out_dtype)


def _zero_mod(score, b, h, q_idx, kv_idx):
    return torch.zeros_like(score)
