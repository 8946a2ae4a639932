"""Fused Triton kernels for the two-stage attention variants (METHOD.md §2).

Importing this package is always safe (it does not import Triton); the kernels are compiled lazily on the
first call of :func:`fused_attention`. ``gravprobe.attention``'s dispatch calls it only when
:func:`is_available` is true. Derivation of the forward and backward passes: ``kernels/README.md``.

Public API
    ``SUPPORTED_VARIANTS`` — ``("softplus", "lssa", "lssar")``
    ``is_available()`` — Triton importable and (CUDA present or ``TRITON_INTERPRET=1``)
    ``supports(variant, dtype=, head_dim=, causal=)`` — whether ``fused_attention`` accepts the call
    ``fused_attention(q, k, v, variant, causal=True, **params)`` — q, k, v ``[B, T, H, D]`` → ``[B, T, H, D]``
"""

from __future__ import annotations

import importlib.util
import os

#: The variants the kernels implement (names of ``gravprobe.attention.reference.REGISTRY``; ``ops`` reads it).
SUPPORTED_VARIANTS = ("softplus", "lssa", "lssar")

__all__ = ["SUPPORTED_VARIANTS", "fused_attention", "is_available", "supports"]


def is_available() -> bool:
    """True when Triton can be imported and can run: a CUDA device is present, or interpreter mode
    (``TRITON_INTERPRET=1``, set before the kernels are first used) runs them on the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def fused_attention(q, k, v, variant: str, causal: bool = True, **params):
    """Fused causal two-stage attention; see :func:`gravprobe.kernels.ops.fused_attention`.

    q, k, v ``[B, T, H, D]`` (fp16/bf16/fp32, D ≤ 128) → ``[B, T, H, D]``; differentiable (Triton backward).
    ``params``: ``sharpen_power``, ``offset``, ``offset_until``, ``log_base`` (defaults: the registry's,
    ``gravprobe.attention.reference.REGISTRY``; ``ops.PARAM_DEFAULTS``).
    """
    from .ops import fused_attention as _fused

    return _fused(q, k, v, variant, causal=causal, **params)


def supports(variant: str, *, dtype=None, head_dim: int | None = None, causal: bool = True) -> bool:
    """Whether :func:`fused_attention` accepts this call (asked by ``gravprobe.attention``'s dispatch):
    variant in ``SUPPORTED_VARIANTS``, dtype fp16/bf16/fp32, head dim 1..128; causal or not."""
    if variant not in SUPPORTED_VARIANTS:
        return False
    if dtype is not None:
        import torch

        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
    return head_dim is None or 1 <= int(head_dim) <= 128
