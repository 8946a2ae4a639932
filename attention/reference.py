"""Every attention variant of METHOD.md §2 in plain PyTorch — the project's single source of truth.

All functions take ``q, k, v`` shaped ``[B, T, H, D]`` (batch, sequence, heads, head dim) and build the
full ``[B, H, T, T]`` weight matrix: readable, exact, and memory-quadratic on purpose (the fused Triton
kernels in ``gravprobe.kernels`` are checked against this file).

Conventions (METHOD.md §2): query rows ``i`` and keys ``j`` are 1-based; with ``causal=True`` row ``i``
sees keys ``j <= i`` and ``n_i = i``; with ``causal=False`` every row sees all ``T`` keys and
``n_i = T``. A window ``W`` (``window=W``, causal only; ``None`` = the full causal context) limits row
``i`` to keys ``max(1, i - W + 1) .. i``, and ``n_i = min(i, W)`` is the number of keys it sees. Every length-dependent quantity uses the row's own ``n_i``; no global length enters, so the
same weights run at any ``T``. Half-precision inputs (float16, bfloat16) are computed in float32 and the
result is returned in the input dtype; float32 and float64 are computed as given.

Derivations and numerics notes (the overflow-safe power, the uniform-row limit) live in README.md.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "VARIANTS",
    "DEFAULT_PARAMS",
    "resolve_params",
    "check_window",
    "attention_weights",
    "reference_attention",
]

#: Every variant name of METHOD.md §2, in the order of its table.
VARIANTS: tuple[str, ...] = ("softmax", "softplus", "lssa", "lssar", "relu", "sigmoid", "ssmax")

#: Parameters each variant accepts, with their defaults (METHOD.md §2: p = 15, natural logarithms,
#: o_i = 0 for n_i <= 3 and 1 otherwise, ssmax scale initialised to 1).
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "softmax": {},
    "softplus": {},
    "lssa": {"log_base": math.e},
    "lssar": {"log_base": math.e, "sharpen_power": 15.0, "offset": 1.0, "offset_until": 3},
    "relu": {},
    "sigmoid": {"log_base": math.e},
    "ssmax": {"log_base": math.e, "ssmax_scale": 1.0},
}

# Clamp for the QK-normalisation of lssa/lssar (as in F.normalize): a zero vector stays zero.
_NORM_EPS = 1e-12


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; valid choices: {', '.join(VARIANTS)}")
    return variant


def _log_base(value: Any) -> float:
    """``log_base`` may be a number > 0 other than 1, or ``"e"``/``None`` for natural logarithms."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("e", "natural")):
        return math.e
    try:
        base = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"log_base must be a number > 0 (not 1) or 'e', got {value!r}") from None
    if not (base > 0.0 and base != 1.0 and math.isfinite(base)):
        raise ValueError(f"log_base must be a finite number > 0 and != 1 (or 'e'), got {value!r}")
    return base


def resolve_params(variant: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``params`` for ``variant`` and fill in the defaults of :data:`DEFAULT_PARAMS`.

    Returns a new dict with every parameter of the variant: ``log_base`` as a float,
    ``sharpen_power``/``offset`` as floats, ``offset_until`` as an int; ``ssmax_scale`` is passed
    through (a float or a tensor of shape ``[H]``). Raises ``ValueError`` naming an unknown variant or
    parameter and listing the valid ones.
    """
    _check_variant(variant)
    allowed = DEFAULT_PARAMS[variant]
    params = dict(params or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"attention variant {variant!r} got unknown parameter(s) {unknown}; "
                         f"it accepts: {valid}")
    out = {**allowed, **params}
    if "log_base" in out:
        out["log_base"] = _log_base(out["log_base"])
    if "sharpen_power" in out:
        p = float(out["sharpen_power"])
        if not (p > 0.0 and math.isfinite(p)):
            raise ValueError(f"sharpen_power must be a finite number > 0, got {out['sharpen_power']!r}")
        out["sharpen_power"] = p
    if "offset" in out:
        out["offset"] = float(out["offset"])
        if not math.isfinite(out["offset"]):
            raise ValueError(f"offset must be finite, got {params['offset']!r}")
    if "offset_until" in out:
        until = out["offset_until"]
        if isinstance(until, bool) or int(until) != until or until < 0:
            raise ValueError(f"offset_until must be an integer >= 0, got {until!r}")
        out["offset_until"] = int(until)
    return out


def check_window(window: Any, causal: bool = True, *, where: str = "window") -> int | None:
    """Validate a window ``W``: ``None`` (full causal context) or an integer >= 1; causal only.

    Returns ``W`` as an int (or None). Raises ``ValueError`` naming ``where`` (e.g. ``attention.window``)."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Real) or int(window) != window or window < 1:
        raise ValueError(f"{where} must be a positive integer (keys each query sees, itself included) or "
                         f"null for the full causal context; got {window!r}")
    if not causal:
        raise ValueError(f"{where}={window!r} needs causal=True (a window is max(1, i-W+1)..i); "
                         f"drop the window or use causal attention")
    return int(window)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, T, H, D]; got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, D]; got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if q.shape[1] < 1 or q.shape[3] < 1:
        raise ValueError(f"need T >= 1 and D >= 1; got q of shape {tuple(q.shape)}")
    if v is not None and (v.ndim != 4 or v.shape[:3] != q.shape[:3]):
        raise ValueError(f"v must be [B, T, H, Dv] with the B, T, H of q {tuple(q.shape)}; "
                         f"got {tuple(v.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and (v is None or v.is_floating_point())):
        raise TypeError("q, k, v must be floating-point tensors (float16, bfloat16, float32 or float64)")


def _row_lengths(T: int, causal: bool, dtype: torch.dtype, device: torch.device,
                 window: int | None = None) -> torch.Tensor:
    """``n_i`` for every query row as a ``[T, 1]`` column: ``min(i, W)`` (1-based ``i``; ``W`` = inf
    without a window) if causal, else ``T``."""
    if causal:
        n = torch.arange(1, T + 1, dtype=dtype, device=device)
        if window is not None:
            n = n.clamp_max(float(window))
        return n.unsqueeze(-1)
    return torch.full((T, 1), float(T), dtype=dtype, device=device)


def _visible(T: int, causal: bool, device: torch.device, window: int | None = None) -> torch.Tensor:
    """``[T, T]`` bool: key ``j`` is visible from query ``i`` (``i - W < j <= i`` with a window)."""
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        if window is not None and window < T:
            mask = mask.triu(-(window - 1))
        return mask
    return torch.ones(T, T, dtype=torch.bool, device=device)


def _dot_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``s_ij = q_i . k_j / sqrt(d)`` as ``[B, H, T, T]`` from ``[B, T, H, D]`` inputs."""
    return torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])


def _normalised_rows(a: torch.Tensor) -> torch.Tensor:
    """Divide each row by its sum (rows of a positive, masked matrix; every row has a visible key)."""
    return a / a.sum(dim=-1, keepdim=True)


def _lssa(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, visible: torch.Tensor,
          log_base: float) -> torch.Tensor:
    """lssa weights ``softplus(s)/sum softplus(s)`` with ``s = log_b(d) log_b(n_i) (q^ . k^)``."""
    d = q.shape[-1]
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    cosine = torch.einsum("bihd,bjhd->bhij", qn, kn)
    ln_b = math.log(log_base)
    length_scale = (math.log(d) / ln_b) * (torch.log(n) / ln_b)          # [T, 1]
    a = F.softplus(length_scale * cosine).masked_fill(~visible, 0.0)
    return _normalised_rows(a)


def _lssar_reweight(a: torch.Tensor, n: torch.Tensor, visible: torch.Tensor, *, sharpen_power: float,
                    offset: float, offset_until: int) -> torch.Tensor:
    """Second stage of lssar: ``w = ReLU(n_i a_ij - o_i)^p`` renormalised per row.

    Overflow-safe: ``ReLU(.)`` is divided by its row maximum before the power (the ratio ``w/sum w`` is
    unchanged, and the largest term becomes exactly 1, so the row sum is >= 1). The maximum is detached:
    the output does not depend on it, so its gradient is zero in exact arithmetic. A row whose every
    ``w`` is 0 (a perfectly uniform stage-1 row with ``o_i > 0``) returns the limit of the definition,
    the uniform row over its visible keys.
    """
    o = torch.where(n <= offset_until, torch.zeros_like(n), torch.full_like(n, offset))  # [T, 1]
    r = torch.relu(n * a - o).masked_fill(~visible, 0.0)
    row_max = r.amax(dim=-1, keepdim=True).detach()
    uniform = row_max <= 0
    # Safe denominators keep NaN out of the branch torch.where discards (NaN would leak into grads).
    w = (r / torch.where(uniform, torch.ones_like(row_max), row_max)).pow(sharpen_power)
    total = w.sum(dim=-1, keepdim=True)
    sharpened = w / torch.where(uniform, torch.ones_like(total), total)
    uniform_row = visible.to(a.dtype) / n
    return torch.where(uniform, uniform_row, sharpened)


def _ssmax_scale(scale: Any, H: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The per-head ssmax scale ``c`` as a ``[1, H, 1, 1]`` (or scalar) tensor."""
    if isinstance(scale, torch.Tensor):
        c = scale.to(dtype=dtype, device=device)  # differentiable: a learnable scale gets its gradient
    else:
        c = torch.tensor(float(scale), dtype=dtype, device=device)
    if c.ndim == 0:
        return c
    if c.shape != (H,):
        raise ValueError(f"ssmax_scale must be a scalar or a tensor of shape [H] = [{H}]; "
                         f"got shape {tuple(c.shape)}")
    return c.view(1, H, 1, 1)


def attention_weights(q: torch.Tensor, k: torch.Tensor, variant: str, *, causal: bool = True,
                      window: int | None = None, **params: Any) -> torch.Tensor:
    """The attention weight matrix ``a_ij`` of METHOD.md §2.

    Args:
        q, k: ``[B, T, H, D]`` queries and keys (any floating dtype).
        variant: one of :data:`VARIANTS`.
        causal: row ``i`` sees keys ``j <= i`` (``n_i = i``); else all keys (``n_i = T``).
        window: ``W`` >= 1 (causal only): row ``i`` sees keys ``max(1, i-W+1) .. i`` and
            ``n_i = min(i, W)`` (enters every length-dependent term); ``None`` = full causal context.
        **params: variant parameters (see :data:`DEFAULT_PARAMS`): ``log_base``, ``sharpen_power``,
            ``offset``, ``offset_until``, ``ssmax_scale`` (scalar or ``[H]`` tensor, differentiable).

    Returns:
        ``[B, H, T, T]`` weights in float32 (float64 for float64 inputs); zero for invisible keys.
        Rows sum to 1 except for ``relu`` and ``sigmoid``, which are not renormalised.
    """
    _check_qkv(q, k)
    p = resolve_params(variant, params)
    window = check_window(window, causal)
    B, T, H, D = q.shape
    dtype = _compute_dtype(q.dtype)
    q, k = q.to(dtype), k.to(dtype)
    n = _row_lengths(T, causal, dtype, q.device, window)
    visible = _visible(T, causal, q.device, window)

    if variant == "softmax":
        return _dot_scores(q, k).masked_fill(~visible, float("-inf")).softmax(dim=-1)
    if variant == "softplus":
        return _normalised_rows(F.softplus(_dot_scores(q, k)).masked_fill(~visible, 0.0))
    if variant == "lssa":
        return _lssa(q, k, n, visible, p["log_base"])
    if variant == "lssar":
        a = _lssa(q, k, n, visible, p["log_base"])                           # pass 1: row sums
        return _lssar_reweight(a, n, visible, sharpen_power=p["sharpen_power"], offset=p["offset"],
                               offset_until=p["offset_until"])               # pass 2: re-weighting
    if variant == "relu":
        return (torch.relu(_dot_scores(q, k)) / n).masked_fill(~visible, 0.0)
    if variant == "sigmoid":
        ln_n = torch.log(n) / math.log(p["log_base"])
        return torch.sigmoid(_dot_scores(q, k) - ln_n).masked_fill(~visible, 0.0)
    if variant == "ssmax":
        c = _ssmax_scale(p["ssmax_scale"], H, dtype, q.device)
        ln_n = torch.log(n) / math.log(p["log_base"])
        logits = c * ln_n * _dot_scores(q, k)
        return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    raise AssertionError(f"variant {variant!r} has no implementation")  # pragma: no cover


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, *,
                        causal: bool = True, window: int | None = None, **params: Any) -> torch.Tensor:
    """Attention output ``o_i = sum_j a_ij v_j`` with the weights of :func:`attention_weights`.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; ``causal``, ``window``, ``params`` as there.
    Returns:
        ``[B, T, H, Dv]`` in the dtype of ``v`` (computed in float32 for half types).
    """
    _check_qkv(q, k, v)
    a = attention_weights(q, k, variant, causal=causal, window=window, **params)
    out = torch.einsum("bhij,bjhd->bihd", a, v.to(a.dtype))
    return out.to(v.dtype)
