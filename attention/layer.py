"""The model's attention layer: projections, rotary positions, the variant by name, the backend by attend.

Everything attention-related that the GPT needs lives here (DESIGN.md: the model holds no attention
math): q/k/v and output projections, RoPE on q and k, the variant's learnable parameters (those the
registry marks ``learnable``, e.g. ``ssmax``'s per-head scale), and the call to the dispatch, which picks
the backend. The variant's parameters are resolved once, at construction. QK-normalisation of ``lssa`` and
``lssar`` happens inside the variant (reference and kernels), after RoPE — a rotation, so it does not
change the norms.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import BACKENDS, attend_resolved, select_backend
from .reference import VARIANTS, _weights, check_window, get_variant, resolve_params

__all__ = ["CausalSelfAttention", "RotaryEmbedding", "apply_rotary"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by position: pairs ``(x[..., m], x[..., m + D/2])`` turn by angle
    ``t * base^(-2m/D)`` (the "rotate half" layout). ``cos``/``sin`` are ``[T, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


#: Use :class:`_ProjectRotate` on the CPU (False: the plain projection + :func:`apply_rotary`, for A/B timing).
FUSED_PROJECTION = True


def _rotate_(x1: torch.Tensor, x2: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """In place: ``(x1, x2) <- (x1 cos - sign x2 sin, x2 cos + sign x1 sin)`` (``sign = -1``: the inverse turn)."""
    tmp = x2 * sin
    x2.mul_(cos).addcmul_(x1, sin, value=sign)
    x1.mul_(cos).sub_(tmp, alpha=sign)


class _ProjectRotate(torch.autograd.Function):
    """``q, k, v`` ``[B, T, H, D]`` = the fused projection ``x W^T + b`` with RoPE turned on q and k in place.

    The same numbers as ``qkv(x).view(...).unbind(2)`` then :func:`apply_rotary` on q and k, with fewer passes
    on the CPU: no ``cat``, no zero-filled slice gradients, no ``stack`` of the q/k/v gradients. The backward
    turns the q/k gradients back (the transposed rotation) into one ``[B, T, 3C]`` buffer, then one GEMM each
    for ``dx`` and ``dW``. q, k, v are views of one buffer (the layer only reads them)."""

    @staticmethod
    def forward(ctx, x, weight, bias, cos, sin, n_heads):
        B, T, C = x.shape
        D = C // n_heads
        half = D // 2
        y = F.linear(x, weight, bias).view(B, T, 3, n_heads, D)
        cos, sin = cos[None, :, None, None, :].to(y.dtype), sin[None, :, None, None, :].to(y.dtype)
        qk = y[:, :, :2]
        _rotate_(qk[..., :half], qk[..., half:], cos, sin, 1.0)
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.has_bias = bias is not None
        q, k, v = y.unbind(2)
        return q, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        x, weight, cos, sin = ctx.saved_tensors
        ref = next(g for g in (gq, gk, gv) if g is not None)
        B, T, H, D = ref.shape
        half = D // 2
        gy = ref.new_empty(B, T, 3, H, D)
        for i, g in enumerate((gq, gk, gv)):
            dst = gy[:, :, i]
            if g is None:
                dst.zero_()
            elif i == 2:
                dst.copy_(g)
            else:                                      # R^T g: (g1 c + g2 s, g2 c - g1 s)
                g1, g2 = g[..., :half], g[..., half:]
                c, s = cos[:, :, 0], sin[:, :, 0]
                torch.mul(g2, s, out=dst[..., :half]).addcmul_(g1, c)
                torch.mul(g2, c, out=dst[..., half:]).addcmul_(g1, s, value=-1.0)
        gy = gy.view(B * T, 3 * H * D)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (gy @ weight.to(gy.dtype)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = (gy.t() @ x.reshape(B * T, -1).to(gy.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = gy.sum(0)
        return dx, dw, db, None, None, None


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) for head dim ``head_dim`` (even), any sequence length.

    The cos/sin tables are cached as non-persistent buffers (float32, computed in float64) and grown
    when a longer sequence arrives, so a model trained at T runs at 16 T without retraining anything.
    Because a rotation by position ``t`` composes as ``R(t_q)^T R(t_k) = R(t_k - t_q)``, the score
    ``q_i . k_j`` after RoPE depends on positions only through ``j - i``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, initial_length: int = 0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}; choose d_model/n_heads even "
                             f"or set rope=False")
        if not base > 1.0:
            raise ValueError(f"rope_base must be > 1, got {base}")
        self.head_dim, self.base = head_dim, float(base)
        self.register_buffer("cos", torch.empty(0, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(0, head_dim // 2), persistent=False)
        if initial_length:
            self._build(initial_length, torch.device("cpu"))

    def _build(self, length: int, device: torch.device) -> None:
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.cos = angles.cos().to(device=device, dtype=torch.float32)
        self.sin = angles.sin().to(device=device, dtype=torch.float32)

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``[length, head_dim/2]`` on ``device`` (grown and cached on demand)."""
        if self.cos.shape[0] < length or self.cos.device != device:
            self._build(max(length, self.cos.shape[0]), device)
        return self.cos[:length], self.sin[:length]

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` ``[B, T, H, D]`` by their positions ``0..T-1``."""
        cos, sin = self.tables(q.shape[1], q.device)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with the METHOD.md §2 variant ``variant``.

    Args:
        d_model: model width C (divisible by ``n_heads``; head dim ``D = C / n_heads``).
        n_heads: number of heads H.
        variant: one of :data:`gravprobe.attention.VARIANTS`.
        params: the variant's parameters by name (``sharpen_power``, ``offset``, ``offset_until``,
            ``log_base``, ...: see :data:`gravprobe.attention.reference.REGISTRY`). Missing ones take the
            defaults; unknown ones raise ``ValueError``. A parameter the registry marks ``learnable`` (e.g.
            ``ssmax_scale``) becomes an ``nn.Parameter`` of that name, shape ``[n_heads]``, initialised to
            the given value (default: the registry's).
        rope: apply rotary position embeddings to q and k (else the model must add positions itself).
        rope_base: RoPE frequency base.
        bias: biases in the q/k/v and output projections.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`gravprobe.attention.attend`).
        window: ``W`` >= 1 or None (full causal context): position ``i`` attends to the last ``W``
            positions ``max(1, i-W+1) .. i`` only, with ``n_i = min(i, W)`` (METHOD.md §2 "Window W").

    ``forward(x [B, T, C]) -> [B, T, C]``, any T >= 1; ``attention_weights(x) -> [B, H, T, T]``.
    """

    def __init__(self, d_model: int, n_heads: int, variant: str, *, params: Mapping[str, Any] | None = None,
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 backend: str = "auto", window: int | None = None) -> None:
        super().__init__()
        if n_heads < 1 or d_model < 1 or d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        spec = get_variant(variant)                                      # ValueError naming the choices
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.variant, self.backend = variant, backend
        self.window = check_window(window, True, where="attention.window")
        resolved = resolve_params(variant, params)                       # once: forward reuses it
        self.learnable = spec.learnable                                   # e.g. ssmax's c per head (METHOD §2)
        for name in self.learnable:
            init = torch.as_tensor(resolved.pop(name), dtype=torch.float32)
            self.register_parameter(name, nn.Parameter(torch.ones(n_heads) * init))
        self.params = resolved                                            # fixed (non-learnable) ones
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    @classmethod
    def from_config(cls, node: Any, d_model: int, n_heads: int, rope: bool = True,
                    **kwargs: Any) -> "CausalSelfAttention":
        """Build from the Hydra node ``cfg.attention`` = ``{name, params, backend, window}`` (or a dict, or
        just a variant name; ``window`` may be absent or null = full causal context). ``kwargs`` go to the
        constructor (``rope_base``, ``bias``)."""
        if isinstance(node, str):
            node = {"name": node}
        try:
            from omegaconf import DictConfig, OmegaConf  # noqa: PLC0415 - optional at import time

            if isinstance(node, DictConfig):
                node = OmegaConf.to_container(node, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(node, Mapping):
            raise TypeError(f"attention config must be a mapping {{name, params, backend, window}} or a variant "
                            f"name, got {type(node).__name__}")
        unknown = sorted(set(node) - {"name", "params", "backend", "window"})
        if unknown:
            raise ValueError(f"attention config has unknown key(s) {unknown}; expected: name, params, backend, "
                             f"window")
        if "name" not in node:
            raise ValueError(f"attention config needs a 'name' (one of {', '.join(VARIANTS)})")
        params = node.get("params") or {}
        if not isinstance(params, Mapping):
            raise ValueError(f"attention.params must be a mapping, got {params!r}")
        window = check_window(node.get("window"), True, where="attention.window")
        return cls(d_model, n_heads, node["name"], params=dict(params), rope=rope,
                   backend=node.get("backend") or "auto", window=window, **kwargs)

    def resolve_backend(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
        """The backend (``"torch"``/``"triton"``) this layer's attention will run on for inputs on
        ``device`` in ``dtype``; logs it on first use. Call once at start-up (e.g. before
        ``torch.compile``, inside which nothing is logged). Raises ``BackendUnavailableError`` when the
        layer forces ``triton`` and the kernels cannot run."""
        probe = torch.empty(1, 1, self.n_heads, self.head_dim, dtype=dtype, device=device)
        return select_backend(probe, self.variant, causal=True, backend=self.backend, window=self.window)

    def _qkv_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """q, k (after RoPE), v ``[B, T, H, D]`` for input ``x`` ``[B, T, C]``, and the variant's params."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x of shape [B, T, {self.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if FUSED_PROJECTION and self.rotary is not None and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") \
                and not torch.compiler.is_compiling():
            # one projection, RoPE in place on its q/k columns (fewer CPU passes; same numbers as below)
            cos, sin = self.rotary.tables(T, x.device)
            q, k, v = _ProjectRotate.apply(x, self.qkv.weight, self.qkv.bias, cos, sin, self.n_heads)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(dim=2)
            if self.rotary is not None:
                q, k = self.rotary(q, k)
        params = dict(self.params)
        for name in self.learnable:
            params[name] = getattr(self, name)
        return q, k, v, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, T, C]`` -> ``[B, T, C]``; position ``t`` attends to positions ``<= t`` (the last
        ``window`` of them when a window is set)."""
        q, k, v, params = self._qkv_params(x)
        B, T, C = x.shape
        y = attend_resolved(q, k, v, self.variant, params, causal=True, backend=self.backend, window=self.window)
        return self.out(y.reshape(B, T, C))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weights ``a_ij`` this layer applies for input ``x`` ``[B, T, C]`` (the layer's own input,
        i.e. after the block's LayerNorm): ``[B, H, T, T]`` float32 (float64 for float64 ``x``), after the
        variant and the window, zero on invisible keys; query rows ``i``, key columns ``j``.

        Computed by the reference (:func:`gravprobe.attention.attention_weights`) whatever the backend:
        ``weights @ v`` is the pre-projection output of :meth:`forward` up to the backend's rounding.
        For analysis (probes), not for training: it materialises ``[B, H, T, T]``.
        """
        q, k, _, params = self._qkv_params(x)
        return _weights(q, k, self.variant, True, self.window, params)

    def extra_repr(self) -> str:
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        win = f", window={self.window}" if self.window is not None else ""
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, variant={self.variant}"
                f"{', ' + shown if shown else ''}, backend={self.backend}{win}")
