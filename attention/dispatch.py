"""Which attention backend runs: the one place that decides, logs it, and lets tests override it.

Backends:
    ``torch``  — plain PyTorch, every variant, device and dtype, causal or not, any window:
                 :func:`gravprobe.attention.eager.eager_attention` (SDPA for softmax/ssmax, fused
                 autograd Functions for softplus/lssa/lssar; the reference for relu/sigmoid), which
                 matches the reference (:mod:`gravprobe.attention.reference`) to rounding.
    ``triton`` — the fused kernels of :mod:`gravprobe.kernels`, called as
                 ``gravprobe.kernels.fused_attention(q, k, v, variant, causal=..., **params)``
                 (``[B, T, H, D]`` in and out) for the variants in ``gravprobe.kernels.SUPPORTED_VARIANTS``.
                 Forced with ``backend="triton"`` it runs on any device the kernels accept, including the
                 CPU under ``TRITON_INTERPRET=1`` (used by the tests).
    ``flex``   — PyTorch FlexAttention (:mod:`gravprobe.attention.flex`) for ``softmax``, ``softplus``,
                 ``lssa``, ``lssar``, any window (block mask): forward and backward on CUDA, forward only
                 on the CPU.
    ``auto``   — per (device type, variant) the first backend of :data:`AUTO_ORDER` that can run the
                 call (Triton: no window, kernels support variant/dtype/head dim; flex: variant supported,
                 no CPU backward); the choice and its reason are logged once.

Overrides for ``auto`` (an explicit ``"torch"``/``"triton"`` argument always wins), first match:
    1. the :func:`backend_override` context manager (``with backend_override("torch"): ...``);
    2. the environment variable ``GRAVPROBE_ATTENTION_BACKEND`` (``auto``, ``torch``, ``triton``, ``flex``).

``gravprobe.kernels`` is imported lazily, once, on first need; :func:`triton_available` says whether
the kernels can run here at all, :func:`kernel_support` whether they can run a given call and why not. :func:`active_backend` says which backend the most recent call used; the
first use of each (backend, device) pair is logged at INFO level.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import torch

from .eager import _eager
from .flex import _flex, flex_support
from .reference import VARIANTS, _check_qkv, check_window, resolve_params

logger = logging.getLogger(__name__)

__all__ = [
    "attend",
    "attend_resolved",
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "active_backend",
    "backend_override",
    "kernel_support",
    "select_backend",
    "triton_available",
]

BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "flex")
ENV_VAR = "GRAVPROBE_ATTENTION_BACKEND"

#: What ``auto`` tries, in order, per (device type, variant), and why (the logged reason). Device types
#: or variants not listed run ``torch``. Source of each order: ``benchmarks/RESULTS.md``.
AUTO_ORDER: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    **{("cpu", v): (("torch",), ("on the CPU the torch backend (attention/eager.py) is the fastest measured for "
                                 "training; FlexAttention has no CPU backward and its CPU forward is not "
                                 "measured faster"))
       for v in VARIANTS},
    ("cuda", "softmax"): (("torch",), ("SDPA (flash) is the yardstick FlexAttention and the kernels are "
                                       "measured against")),
    **{("cuda", v): (("triton", "flex", "torch"), ("Triton kernels first, then FlexAttention (with a window, "
                                                   "which the kernels lack): default until "
                                                   "benchmarks/gpu_check.sh has measured them on a GPU"))
       for v in ("softplus", "lssa", "lssar")},
}

# Used when gravprobe.kernels does not define its own `supports(...)` predicate.
_DEFAULT_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEFAULT_KERNEL_MAX_HEAD_DIM = 128


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was requested but the kernels cannot run this call."""


_kernels_module: Any = None
_kernels_error: str | None = None
_kernels_loaded = False
_override: list[str] = []
_active: str | None = None
_logged: set[tuple[str, str]] = set()


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} ({where}); valid choices: {', '.join(BACKENDS)}")
    return name


def _load_kernels() -> tuple[Any, str | None]:
    """Import ``gravprobe.kernels`` once; return ``(module or None, reason it is unusable or None)``."""
    # No lock: Python's import lock already serialises the import, and a race only repeats this work.
    global _kernels_module, _kernels_error, _kernels_loaded
    if not _kernels_loaded:
        try:
            import gravprobe.kernels as kernels  # noqa: PLC0415 - lazy on purpose (DESIGN.md)

            missing = [n for n in ("fused_attention", "SUPPORTED_VARIANTS") if not hasattr(kernels, n)]
            if missing:
                raise ImportError(f"gravprobe.kernels does not define {', '.join(missing)}")
            _kernels_module, _kernels_error = kernels, None
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable", with the reason
            _kernels_module, _kernels_error = None, f"{type(exc).__name__}: {exc}"
        _kernels_loaded = True
    return _kernels_module, _kernels_error


def _reset() -> None:
    """Forget the cached kernel import and the logged decisions (for tests)."""
    global _kernels_module, _kernels_error, _kernels_loaded, _active
    _kernels_module, _kernels_error, _kernels_loaded, _active = None, None, False, None
    _logged.clear()


def triton_available() -> bool:
    """Whether ``gravprobe.kernels`` imports and can run here (CUDA, or ``TRITON_INTERPRET=1``)."""
    kernels, _ = _load_kernels()
    if kernels is None:
        return False
    is_available = getattr(kernels, "is_available", None)
    return bool(is_available()) if callable(is_available) else True


def kernel_support(q: torch.Tensor, variant: str, causal: bool) -> tuple[bool, str]:
    """Whether the Triton kernels can run this call; ``(ok, reason)`` with the reason when not.

    Requires ``gravprobe.kernels`` to import, its ``is_available()`` (when defined: Triton importable and
    CUDA or ``TRITON_INTERPRET=1``) to be true and ``variant`` to be in ``SUPPORTED_VARIANTS``; then asks
    ``gravprobe.kernels.supports(variant, dtype=..., head_dim=..., causal=...)`` when defined, else
    requires fp16/bf16/fp32 and head dim <= 128.
    """
    kernels, error = _load_kernels()
    if kernels is None:
        return False, f"gravprobe.kernels is not usable ({error})"
    is_available = getattr(kernels, "is_available", None)
    if callable(is_available) and not is_available():
        return False, "Triton cannot run here (no CUDA device and TRITON_INTERPRET is not 1)"
    if variant not in tuple(kernels.SUPPORTED_VARIANTS):
        return False, (f"the Triton kernels do not implement variant {variant!r} "
                       f"(they support: {', '.join(kernels.SUPPORTED_VARIANTS)})")
    supports = getattr(kernels, "supports", None)
    if callable(supports):
        ok = bool(supports(variant, dtype=q.dtype, head_dim=q.shape[-1], causal=causal))
        return ok, "" if ok else (f"the Triton kernels do not support {variant!r} with dtype {q.dtype}, "
                                  f"head dim {q.shape[-1]}, causal={causal}")
    if q.dtype not in _DEFAULT_KERNEL_DTYPES:
        return False, f"the Triton kernels do not take dtype {q.dtype}"
    if q.shape[-1] > _DEFAULT_KERNEL_MAX_HEAD_DIM:
        return False, f"the Triton kernels take head dims up to {_DEFAULT_KERNEL_MAX_HEAD_DIM}, got {q.shape[-1]}"
    return True, ""


def _requested_auto() -> str:
    if _override:
        return _override[-1]
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return _check_backend(env, f"environment variable {ENV_VAR}") if env else "auto"


def _log_once(key: tuple[str, str], level: int, msg: str, *args: Any) -> None:
    # Logging inside a torch.compile trace would break the graph; the eager first call logs instead.
    if key not in _logged and not torch.compiler.is_compiling():
        _logged.add(key)
        logger.log(level, msg, *args)


def _can_run(name: str, q: torch.Tensor, variant: str, causal: bool, window: int | None,
             needs_grad: bool) -> tuple[bool, str]:
    if name == "triton":
        if window is not None:
            return False, f"window={window} is set (the Triton kernels have no window)"
        return kernel_support(q, variant, causal)
    if name == "flex":
        return flex_support(q, variant, causal, needs_grad=needs_grad)
    return True, ""


def select_backend(q: torch.Tensor, variant: str, *, causal: bool = True, backend: str = "auto",
                   window: int | None = None, needs_grad: bool | None = None) -> str:
    """Resolve ``backend`` (``auto``/``torch``/``triton``/``flex``) to the one that runs this call.

    ``needs_grad`` (default: ``q.requires_grad`` with grad mode on) matters for ``flex``, which has no
    CPU backward. Raises :class:`BackendUnavailableError` when ``triton`` or ``flex`` is forced (by
    argument, override or environment) but cannot run the call, with the reason. A ``window`` (the
    Triton kernels have none) resolves a forced ``triton`` to ``torch`` and logs why once (issue 14 §2).
    """
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and q.requires_grad
    global _active
    requested = _check_backend(backend, "argument backend=")
    if requested == "auto":
        requested = _requested_auto()
    if window is not None and requested == "triton":
        _log_once(("window-fallback", str(q.device)), logging.WARNING,
                  "attention backend 'triton' was requested with window=%d, which the Triton kernels do not "
                  "implement; falling back to the torch reference (variant %s)", window, variant)
        requested = "torch"
    if requested == "triton":
        ok, reason = kernel_support(q, variant, causal)
        if not ok:
            raise BackendUnavailableError(
                f"attention backend 'triton' was requested but cannot run: {reason}. "
                f"Use backend='torch' (or 'auto'), or unset {ENV_VAR}.")
        chosen = "triton"
    elif requested == "flex":
        ok, reason = flex_support(q, variant, causal, needs_grad=needs_grad)
        if not ok:
            raise BackendUnavailableError(
                f"attention backend 'flex' was requested but cannot run: {reason}. "
                f"Use backend='torch' (or 'auto'), or unset {ENV_VAR}.")
        chosen = "flex"
    elif requested == "torch":
        chosen = "torch"
    else:
        device_type = "cuda" if q.is_cuda else q.device.type
        order, why = AUTO_ORDER.get((device_type, variant), (("torch",), "no other backend is listed"))
        chosen, skipped = "torch", []
        for name in order:
            ok, reason = _can_run(name, q, variant, causal, window, needs_grad)
            if ok:
                chosen = name
                break
            skipped.append(f"{name}: {reason}")
        _log_once(("auto", variant, device_type, chosen, str(window is None), str(needs_grad)), logging.INFO,
                  "attention backend auto -> %s for %s on %s (%s%s)", chosen, variant, device_type, why,
                  "; skipped " + "; ".join(skipped) if skipped else "")
    _active = chosen
    _log_once((chosen, str(q.device)), logging.INFO,
              "attention backend: %s on device %s (first call: variant %s, dtype %s)",
              chosen, q.device, variant, str(q.dtype).removeprefix("torch."))
    return chosen


def active_backend() -> str | None:
    """The backend the most recent attention call ran on (``"torch"``/``"triton"``/``"flex"``), None before
    any."""
    return _active


@contextlib.contextmanager
def backend_override(backend: str) -> Iterator[None]:
    """Within the block, calls made with ``backend="auto"`` resolve as if ``backend`` had been given."""
    _override.append(_check_backend(backend, "backend_override"))
    try:
        yield
    finally:
        _override.pop()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, *, causal: bool = True,
           backend: str = "auto", window: int | None = None, **params: Any) -> torch.Tensor:
    """Attention of METHOD.md §2 by variant name, on the backend :func:`select_backend` picks.

    Args:
        q, k: ``[B, T, H, D]`` queries and keys; v: ``[B, T, H, D]`` values (any T >= 1, any D).
        variant: one of ``VARIANTS`` (the names of :data:`gravprobe.attention.reference.REGISTRY`).
        causal: row ``i`` (1-based) sees keys ``j <= i`` with ``n_i = i``; else all, ``n_i = T``.
        backend: ``"auto"`` (per device and variant, :data:`AUTO_ORDER`), ``"torch"``, ``"triton"`` or
            ``"flex"``.
        window: ``W`` >= 1 (causal only; None = full causal context): row ``i`` sees keys
            ``max(1, i-W+1) .. i`` and ``n_i = min(i, W)``. The Triton kernels have no window: such calls
            run on the torch reference (logged once).
        **params: the variant's parameters by name (``log_base``, ``sharpen_power``, ``offset``,
            ``offset_until``, ``ssmax_scale``); missing ones take the registry's defaults
            (:data:`DEFAULT_PARAMS`); unknown ones raise ``ValueError``.

    Returns:
        ``[B, T, H, D]`` in the dtype of ``v``.

    The parameters are resolved once, here (:func:`resolve_params`); every backend receives them resolved
    (defaults filled in, ``log_base`` a float).
    """
    resolved = resolve_params(variant, params)
    window = check_window(window, causal)
    _check_qkv(q, k, v)
    return attend_resolved(q, k, v, variant, resolved, causal=causal, backend=backend, window=window)


def attend_resolved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, params: dict[str, Any], *,
                    causal: bool = True, backend: str = "auto", window: int | None = None) -> torch.Tensor:
    """:func:`attend` for callers that resolved the parameters and checked the inputs themselves.

    ``params`` must be :func:`resolve_params`'s result for ``variant`` (a learnable parameter may be
    replaced by its ``[H]`` tensor) and ``window`` :func:`check_window`'s; ``q, k, v`` ``[B, T, H, D]``
    as in :func:`attend`. Nothing is validated again: the attention layer resolves its parameters once,
    at construction, and calls this on every forward pass.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    chosen = select_backend(q, variant, causal=causal, backend=backend, window=window, needs_grad=needs_grad)
    if chosen == "triton":
        kernels, _ = _load_kernels()
        return kernels.fused_attention(q, k, v, variant, causal=causal, **params)
    if chosen == "flex":
        return _flex(q, k, v, variant, causal, window, params)
    return _eager(q, k, v, variant, causal, window, params)
