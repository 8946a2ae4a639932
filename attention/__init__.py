"""Attention variants of METHOD.md §2: the plain-PyTorch reference, the backend dispatch, the layer.

Public API:
    attend(q, k, v, variant, *, causal=True, backend="auto", **params)  — ``[B, T, H, D]`` in and out
    REGISTRY (name -> Variant: weight function, Params with defaults, learnable ones) — one declaration
    VARIANTS, DEFAULT_PARAMS, resolve_params(variant, params)             — read from the registry
    attention_weights(q, k, variant, ...), reference_attention(...)      — the reference
    CausalSelfAttention(d_model, n_heads, variant, ...)                  — the model's attention layer
    active_backend(), backend_override(name), triton_available()         — dispatch state and overrides

See README.md in this folder for the formulas and numerics notes.
"""
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    BackendUnavailableError,
    active_backend,
    attend,
    backend_override,
    select_backend,
    triton_available,
)
from .layer import CausalSelfAttention, RotaryEmbedding, apply_rotary
from .reference import (
    DEFAULT_PARAMS,
    REGISTRY,
    VARIANTS,
    Param,
    Variant,
    attention_weights,
    get_variant,
    reference_attention,
    resolve_params,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_PARAMS",
    "ENV_VAR",
    "REGISTRY",
    "VARIANTS",
    "BackendUnavailableError",
    "Param",
    "Variant",
    "CausalSelfAttention",
    "RotaryEmbedding",
    "apply_rotary",
    "active_backend",
    "attend",
    "attention_weights",
    "backend_override",
    "get_variant",
    "reference_attention",
    "resolve_params",
    "select_backend",
    "triton_available",
]
