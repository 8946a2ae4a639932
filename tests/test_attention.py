"""The plain-PyTorch reference of every METHOD.md §2 variant against the formulas themselves."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gravprobe.attention import (
    DEFAULT_PARAMS,
    REGISTRY,
    VARIANTS,
    attend,
    attention_weights,
    reference_attention,
    resolve_params,
)

# Read from the registry's declarations; the tests below check them against the weights themselves.
NORMALISED = tuple(v for v in VARIANTS if REGISTRY[v].normalised)
UNNORMALISED = tuple(v for v in VARIANTS if not REGISTRY[v].normalised)


def _qkv(B=2, T=5, H=3, D=4, dtype=torch.float64, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, Dv or D, generator=g, dtype=dtype)
    return q, k, v


# --- a direct transcription of METHOD.md §2: python loops over (b, h, i, j), float64 scalars -----------

def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def loop_attention(q, k, v, variant, *, causal=True, log_base=math.e, sharpen_power=15.0, offset=1.0,
                   offset_until=3, ssmax_scale=None, window=None):
    B, T, H, D = q.shape
    q, k, v = q.double().tolist(), k.double().tolist(), v.double().tolist()
    log = lambda x: math.log(x) / math.log(log_base)  # noqa: E731
    out = [[[[0.0] * len(v[0][0][0]) for _ in range(H)] for _ in range(T)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            for i in range(1, T + 1):                       # 1-based query row
                if window is not None:                      # METHOD §2 "Window W"
                    keys = range(max(1, i - window + 1), i + 1)
                    n = min(i, window)
                else:
                    n = i if causal else T                  # visible keys
                    keys = range(1, n + 1)
                assert len(keys) == n
                qi = q[b][i - 1][h]
                s = {j: sum(x * y for x, y in zip(qi, k[b][j - 1][h])) / math.sqrt(D) for j in keys}
                if variant == "softmax":
                    e = {j: math.exp(s[j]) for j in keys}
                    a = {j: e[j] / sum(e.values()) for j in keys}
                elif variant == "softplus":
                    e = {j: _softplus(s[j]) for j in keys}
                    a = {j: e[j] / sum(e.values()) for j in keys}
                elif variant in ("lssa", "lssar"):
                    qn = math.sqrt(sum(x * x for x in qi))
                    e = {}
                    for j in keys:
                        kj = k[b][j - 1][h]
                        kn = math.sqrt(sum(x * x for x in kj))
                        cos = sum(x * y for x, y in zip(qi, kj)) / (qn * kn)
                        e[j] = _softplus(log(D) * log(n) * cos)
                    a = {j: e[j] / sum(e.values()) for j in keys}
                    if variant == "lssar":
                        o = 0.0 if n <= offset_until else offset   # the row's own n_i
                        w = {j: max(n * a[j] - o, 0.0) ** sharpen_power for j in keys}
                        total = sum(w.values())      # all 0: the limit is the uniform row (§2 note)
                        a = {j: (w[j] / total if total > 0 else 1.0 / n) for j in keys}
                elif variant == "relu":
                    a = {j: max(s[j], 0.0) / n for j in keys}
                elif variant == "sigmoid":
                    a = {j: 1.0 / (1.0 + math.exp(-(s[j] - log(n)))) for j in keys}
                elif variant == "ssmax":
                    c = 1.0 if ssmax_scale is None else float(ssmax_scale[h])
                    e = {j: math.exp(c * log(n) * s[j]) for j in keys}
                    a = {j: e[j] / sum(e.values()) for j in keys}
                else:
                    raise AssertionError(f"loop_attention has no transcription of variant {variant!r}: a new "
                                         f"registry entry needs its formula written out here")
                for j in keys:
                    for m, vm in enumerate(v[b][j - 1][h]):
                        out[b][i - 1][h][m] += a[j] * vm
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_matches_loop_transcription(variant, causal):
    for T, D in ((1, 4), (6, 3)):
        q, k, v = _qkv(B=2, T=T, H=2, D=D, seed=T)
        got = attend(q, k, v, variant, causal=causal, backend="torch")
        want = loop_attention(q, k, v, variant, causal=causal)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant,params", [
    ("lssa", {"log_base": 2.0}),
    ("lssar", {"sharpen_power": 3, "offset": 0.5, "offset_until": 1, "log_base": 10.0}),
    ("lssar", {"sharpen_power": 1.5, "offset": 1.0, "offset_until": 0}),
    ("sigmoid", {"log_base": 2.0}),
    ("ssmax", {"ssmax_scale": torch.tensor([0.5, 2.0], dtype=torch.float64), "log_base": 3.0}),
])
def test_reference_matches_loop_with_params(variant, params):
    q, k, v = _qkv(B=1, T=7, H=2, D=5, seed=3)
    for causal in (True, False):
        got = attend(q, k, v, variant, causal=causal, backend="torch", **params)
        want = loop_attention(q, k, v, variant, causal=causal, **params)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_defaults_are_method_defaults():
    assert DEFAULT_PARAMS["lssar"] == {"log_base": math.e, "sharpen_power": 15.0, "offset": 1.0,
                                       "offset_until": 3}
    # METHOD's variants keep their declarations (a new variant may add to these)
    assert NORMALISED[:5] == ("softmax", "softplus", "lssa", "lssar", "ssmax")
    assert UNNORMALISED[:2] == ("relu", "sigmoid")
    assert REGISTRY["ssmax"].learnable == ("ssmax_scale",)
    assert not any(REGISTRY[v].learnable for v in ("softmax", "softplus", "lssa", "lssar", "relu", "sigmoid"))
    assert resolve_params("lssa", {"log_base": "e"})["log_base"] == math.e
    q, k, v = _qkv(B=1, T=6, H=1, D=4, seed=1)
    explicit = attend(q, k, v, "lssar", sharpen_power=15, offset=1, offset_until=3, log_base="e")
    torch.testing.assert_close(attend(q, k, v, "lssar"), explicit, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_values_return_the_weights_and_rows_sum_to_one(variant, causal):
    """With v_j = e_j (one-hot), o_i = sum_j a_ij e_j is row i of the weight matrix."""
    T = 9
    q, k, _ = _qkv(B=2, T=T, H=3, D=8, seed=4)
    v = torch.eye(T, dtype=q.dtype).view(1, T, 1, T).expand(2, T, 3, T)
    rows = attend(q, k, v, variant, causal=causal, backend="torch")          # [B, T(i), H, T(j)]
    weights = attention_weights(q, k, variant, causal=causal)                # [B, H, T(i), T(j)]
    torch.testing.assert_close(rows, weights.permute(0, 2, 1, 3), rtol=1e-12, atol=1e-12)
    assert (weights >= 0).all()
    if causal:
        assert (weights.triu(diagonal=1) == 0).all()
    if variant in NORMALISED:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, T, dtype=q.dtype), rtol=1e-12, atol=1e-12)
    else:
        assert (weights.sum(-1) - 1).abs().max() > 1e-3   # genuinely not renormalised


@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_future_keys_and_values_change_nothing(variant):
    T, t0 = 12, 7
    q, k, v = _qkv(B=2, T=T, H=2, D=6, dtype=torch.float32, seed=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, t0:] += 3 * torch.randn_like(k2[:, t0:])
    v2[:, t0:] += 3 * torch.randn_like(v2[:, t0:])
    a = attend(q, k, v, variant, backend="torch")
    b = attend(q, k2, v2, variant, backend="torch")
    assert torch.equal(a[:, :t0], b[:, :t0])
    assert not torch.allclose(a[:, t0:], b[:, t0:])          # the perturbation is visible later
    # non-causal attention does see the future
    a_nc = attend(q, k, v, variant, causal=False, backend="torch")
    b_nc = attend(q, k2, v2, variant, causal=False, backend="torch")
    assert not torch.allclose(a_nc[:, :t0], b_nc[:, :t0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_equals_torch_sdpa(causal, dtype):
    for T, D in ((1, 8), (37, 16), (64, 5)):
        q, k, v = _qkv(B=2, T=T, H=3, D=D, dtype=dtype, seed=T)
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(attend(q, k, v, "softmax", causal=causal, backend="torch"), want,
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [True, False])
def test_lssar_with_power_one_and_no_offset_is_lssa(causal):
    q, k, v = _qkv(B=2, T=20, H=2, D=8, seed=6)
    lssa = attend(q, k, v, "lssa", causal=causal, backend="torch")
    lssar = attend(q, k, v, "lssar", causal=causal, backend="torch", sharpen_power=1, offset=0)
    torch.testing.assert_close(lssar, lssa, rtol=1e-12, atol=1e-12)
    sharpened = attend(q, k, v, "lssar", causal=causal, backend="torch")
    assert not torch.allclose(sharpened, lssa, atol=1e-3)


def test_lssar_uniform_row_returns_the_uniform_limit():
    """Identical keys make every stage-1 row exactly uniform; an offset above n_i a_ij zeroes every w."""
    T, D = 10, 4
    q, _, v = _qkv(B=1, T=T, H=2, D=D, seed=7)
    k = torch.randn(1, 1, 2, D, dtype=torch.float64).expand(1, T, 2, D).contiguous()
    uniform = torch.tril(torch.ones(T, T, dtype=torch.float64)) / torch.arange(1, T + 1)[:, None]
    w = attention_weights(q, k, "lssar")
    torch.testing.assert_close(w, uniform.expand_as(w), rtol=1e-12, atol=1e-12)

    # every w_ij = ReLU(n_i a_ij - o_i)^p is exactly 0 when o_i >= n_i: the 0/0 case
    q.requires_grad_(True)
    w = attention_weights(q, k.clone().requires_grad_(True), "lssar", offset=100.0, offset_until=0)
    torch.testing.assert_close(w.detach(), uniform.expand_as(w), rtol=0, atol=0)
    out = attend(q, k, v, "lssar", offset=100.0, offset_until=0)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(out[0, :, 0], torch.cumsum(v[0, :, 0], 0) / torch.arange(1, T + 1)[:, None])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lssar_rows_within_rounding_of_uniform_take_the_limit_on_every_backend(dtype):
    """Keys equal up to 1e-9 (relative): every stage-1 row is uniform to rounding, ``max n_i a_ij - 1`` far
    below UNIFORM_ROW_RTOL, so reference, torch and flex all return the visible values' mean (the power no
    longer picks among rounding noise: a GEMM may round identical columns differently). Keys 1e-2 apart are
    not uniform: the backends agree on the sharpened rows instead."""
    from gravprobe.attention.reference import UNIFORM_ROW_RTOL

    T, D = 12, 8
    q, k, v = _qkv(B=2, T=T, H=2, D=D, dtype=dtype, seed=3)
    base = k[:, :1].expand_as(k)
    mean = torch.cumsum(v, 1) / torch.arange(1, T + 1, dtype=dtype).view(1, T, 1, 1)
    rows = slice(4, None)                                  # rows with o_i = 1 (n_i > offset_until = 3)
    near = base + 1e-9 * k
    for backend in ("torch", "flex"):
        torch.testing.assert_close(attend(near, near, v, "lssar", backend=backend)[:, rows], mean[:, rows])
    torch.testing.assert_close(reference_attention(q, near, v, "lssar")[:, rows], mean[:, rows])
    apart = base + 1e-2 * k
    ref = reference_attention(q, apart, v, "lssar")
    assert (ref[:, rows] - mean[:, rows]).abs().max() > 100 * UNIFORM_ROW_RTOL
    if dtype == torch.float64:                # (float32 against float32: p = 15 amplifies rounding)
        for backend in ("torch", "flex"):
            torch.testing.assert_close(attend(q, apart, v, "lssar", backend=backend), ref, rtol=1e-9, atol=1e-10)


def test_lssa_handles_zero_vectors():
    """QK-normalisation clamps the norm: a zero query gives cosines 0, i.e. a uniform lssa row."""
    q, k, v = _qkv(B=1, T=6, H=1, D=4, seed=8)
    q[0, 3] = 0.0
    w = attention_weights(q, k, "lssa")
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0, 0, 3, :4], torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_float64(variant, causal):
    q, k, v = (t.requires_grad_(True) for t in _qkv(B=1, T=5, H=2, D=3, seed=9))
    inputs = [q, k, v]
    params = {"sharpen_power": 3.0} if variant == "lssar" else {}
    if variant == "ssmax":
        c = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
        inputs.append(c)

        def fn(q, k, v, c):
            return attend(q, k, v, variant, causal=causal, backend="torch", ssmax_scale=c)
    else:
        def fn(q, k, v):
            return attend(q, k, v, variant, causal=causal, backend="torch", **params)
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_lssar_headline_power():
    q, k, v = (t.requires_grad_(True) for t in _qkv(B=1, T=6, H=1, D=4, seed=10))
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, "lssar", backend="torch"),
                                    (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("power", [15, 32])
def test_lssar_large_T_float32_has_no_overflow(power):
    T, D = 2048, 8
    q, k, v = _qkv(B=1, T=T, H=2, D=D, dtype=torch.float32, seed=11)
    # head 1: one key aligned with every query, all others opposite: n_i a_ij reaches ~n_i, so a naive
    # ReLU(n_i a_ij - 1)^p is far beyond float32 (2047^15 ~ 4e49)
    q[:, :, 1] = q[:, :1, 1]
    k[:, :, 1] = -q[:, :, 1]
    k[:, 0, 1] = q[:, 0, 1]
    q.requires_grad_(True)
    a = attention_weights(q.detach(), k, "lssa")
    n = torch.arange(1, T + 1, dtype=torch.float32)[:, None]
    assert torch.isinf(torch.relu(n * a - 1).pow(power)).any()        # the hazard is real here
    out = attend(q, k, v, "lssar", sharpen_power=power, backend="torch")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 1], v[0, :1, 1].expand(T, D))  # all weight on the aligned key
    w = attention_weights(q.detach(), k, "lssar", sharpen_power=power)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, T))
    out.square().mean().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_inputs_close_to_float32(variant, dtype, tol):
    q, k, v = _qkv(B=2, T=33, H=2, D=16, dtype=torch.float32, seed=12)
    qh, kh, vh = q.to(dtype), k.to(dtype), v.to(dtype)
    out = attend(qh, kh, vh, variant, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = attend(qh.float(), kh.float(), vh.float(), variant, backend="torch")   # same rounded inputs
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)
    # and close to the unrounded float32 result, within the input rounding
    loose = attend(q, k, v, variant, backend="torch")
    assert (out.float() - loose).abs().max() < 25 * tol


def test_value_head_dim_may_differ_and_any_head_dim():
    q, k, v = _qkv(B=1, T=7, H=2, D=1, seed=13, Dv=5)
    for variant in VARIANTS:
        out = attend(q, k, v, variant, backend="torch")
        assert out.shape == (1, 7, 2, 5) and torch.isfinite(out).all()
    torch.testing.assert_close(reference_attention(q, k, v, "lssa"), attend(q, k, v, "lssa"))


def test_bad_input_errors_name_the_problem():
    q, k, v = _qkv(B=1, T=4, H=2, D=3)
    with pytest.raises(ValueError, match="valid choices: softmax, softplus, lssa, lssar, relu, sigmoid, ssmax"):
        attend(q, k, v, "flash")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['power'\].*sharpen_power"):
        attend(q, k, v, "lssar", power=3)
    with pytest.raises(ValueError, match="accepts: none"):
        attend(q, k, v, "softmax", log_base=2)
    with pytest.raises(ValueError, match="log_base"):
        attend(q, k, v, "lssa", log_base=1)
    with pytest.raises(ValueError, match="sharpen_power"):
        attend(q, k, v, "lssar", sharpen_power=0)
    with pytest.raises(ValueError, match="offset_until"):
        attend(q, k, v, "lssar", offset_until=-1)
    with pytest.raises(ValueError, match=r"ssmax_scale must be a scalar or a tensor of shape \[H\]"):
        attend(q, k, v, "ssmax", ssmax_scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        attend(q[0], k[0], v[0], "softmax")
    with pytest.raises(ValueError, match="same shape"):
        attend(q, k[:, :3], v, "softmax")
    with pytest.raises(ValueError, match=r"backend"):
        attend(q, k, v, "softmax", backend="cuda")


# --- window W (METHOD §2 "Window W", issue 14 §2) ------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T,window", [(1, 1), (7, 1), (7, 2), (9, 3), (11, 5), (6, 6), (6, 9)])
def test_window_matches_loop_transcription(variant, T, window):
    q, k, v = _qkv(B=1, T=T, H=2, D=3, seed=T + 7 * window)
    got = attend(q, k, v, variant, backend="torch", window=window)
    want = loop_attention(q, k, v, variant, window=window)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant,params", [
    ("lssar", {"sharpen_power": 3, "offset": 0.5, "offset_until": 1, "log_base": 10.0}),
    ("lssar", {"sharpen_power": 15.0, "offset": 1.0, "offset_until": 3}),   # o_i = 0 while n_i <= 3
    ("sigmoid", {"log_base": 2.0}),
    ("ssmax", {"ssmax_scale": torch.tensor([0.5, 2.0], dtype=torch.float64), "log_base": 3.0}),
])
def test_window_matches_loop_with_params(variant, params):
    q, k, v = _qkv(B=2, T=10, H=2, D=4, seed=5)
    for window in (2, 4, 7):
        got = attend(q, k, v, variant, backend="torch", window=window, **params)
        want = loop_attention(q, k, v, variant, window=window, **params)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_at_least_T_is_no_window_and_w1_sees_only_itself(variant):
    q, k, v = _qkv(B=2, T=8, H=2, D=4, seed=2)
    full = attend(q, k, v, variant, backend="torch")
    for window in (8, 9, 1000):
        torch.testing.assert_close(attend(q, k, v, variant, backend="torch", window=window), full,
                                   rtol=0, atol=0)
    a = attention_weights(q, k, variant, window=1)
    assert torch.equal(a != 0, torch.eye(8, dtype=torch.bool).expand_as(a) & (a != 0))   # only j = i
    if variant not in UNNORMALISED:
        torch.testing.assert_close(a, torch.eye(8, dtype=a.dtype).expand_as(a))


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_keys_outside_change_nothing(variant):
    q, k, v = _qkv(B=1, T=9, H=2, D=4, seed=4)
    window, i = 3, 8                                 # 0-based row 8 sees keys 6, 7, 8
    base = attend(q, k, v, variant, backend="torch", window=window)[:, i]
    k2, v2 = k.clone(), v.clone()
    k2[:, : i - window + 1] = torch.randn_like(k2[:, : i - window + 1])
    v2[:, : i - window + 1] = 5.0
    torch.testing.assert_close(attend(q, k2, v2, variant, backend="torch", window=window)[:, i], base)


def test_window_gradients_float64():
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, T=6, H=1, D=3, seed=9))
    for variant in ("lssa", "lssar", "ssmax"):
        params = {"sharpen_power": 3.0} if variant == "lssar" else {}
        assert torch.autograd.gradcheck(
            lambda q, k, v, variant=variant, params=params: attend(q, k, v, variant, window=3, **params),
            (q, k, v))


def test_window_errors_name_the_problem():
    q, k, v = _qkv(B=1, T=4, H=1, D=2)
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(ValueError, match="window must be a positive integer"):
            attend(q, k, v, "softmax", window=bad)
    with pytest.raises(ValueError, match="needs causal=True"):
        attend(q, k, v, "softmax", causal=False, window=2)
    torch.testing.assert_close(attend(q, k, v, "lssa", window=2.0), attend(q, k, v, "lssa", window=2))


# --- the torch backend's fast path (attention/eager.py) against the reference ---------------------------

@pytest.mark.parametrize("chunk", [None, 1])          # one block kept / one sequence per recomputed block
@pytest.mark.parametrize("variant,params", [
    ("softmax", {}), ("softplus", {}), ("lssa", {}), ("ssmax", {}),
    ("lssar", {}), ("lssar", {"sharpen_power": 3.0}), ("lssar", {"sharpen_power": 1.0, "offset_until": 0}),
    ("lssar", {"sharpen_power": 1.5, "offset": 0.5}), ("lssar", {"sharpen_power": 70.0}),
])
def test_eager_matches_reference_values_and_gradients(variant, params, chunk, monkeypatch):
    from gravprobe.attention import eager

    if chunk is not None:
        monkeypatch.setattr(eager, "CHUNK_ELEMENTS", chunk)
    for causal, window in ((True, None), (True, 3), (False, None)):
        q, k, v = (t.requires_grad_() for t in _qkv(B=3, T=8, H=2, D=4, seed=21))
        got = eager.eager_attention(q, k, v, variant, causal=causal, window=window, **params)
        want = reference_attention(q, k, v, variant, causal=causal, window=window, **params)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_eager_lssar_uniform_rows_and_zero_vectors_match_the_reference():
    from gravprobe.attention import eager

    T = 9
    q, _, v = _qkv(B=1, T=T, H=2, D=3, seed=22)
    q[0, 5, 0] = 0.0                                  # a zero query: cosines 0, a uniform lssa row
    k = torch.randn(1, 1, 2, 3, dtype=torch.float64).expand(1, T, 2, 3).contiguous()   # identical keys
    uniform = torch.cumsum(v, 1) / torch.arange(1, T + 1, dtype=torch.float64)[None, :, None, None]
    torch.testing.assert_close(eager.eager_attention(q, k, v, "lssar"), uniform, rtol=1e-12, atol=1e-12)
    k = torch.randn_like(k)
    for params in ({"sharpen_power": 3.0}, {"offset": 100.0, "offset_until": 0}):   # the 0/0 limit
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        got = eager.eager_attention(q, k, v, "lssar", **params)
        want = reference_attention(q, k, v, "lssar", **params)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        grads = zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v)))
        for a, b in grads:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_eager_float32_close_to_float64_reference():
    from gravprobe.attention import eager

    q, k, v = _qkv(B=2, T=64, H=2, D=16, seed=23)
    for variant in eager.FAST_VARIANTS:
        got = eager.eager_attention(q.float(), k.float(), v.float(), variant)
        torch.testing.assert_close(got.double(), reference_attention(q, k, v, variant), rtol=1e-4, atol=2e-5)


# --- the registry: one declaration per variant (issue 12) -----------------------------------------------

def test_registry_states_each_variant_once_and_everything_reads_it():
    from gravprobe.attention import dispatch, eager, flex

    assert VARIANTS[:7] == ("softmax", "softplus", "lssa", "lssar", "relu", "sigmoid", "ssmax")   # METHOD order
    assert tuple(REGISTRY) == VARIANTS and all(REGISTRY[v].name == v for v in VARIANTS)
    assert DEFAULT_PARAMS == {v: {p.name: p.default for p in REGISTRY[v].params} for v in VARIANTS}
    for v in VARIANTS:
        assert resolve_params(v) == DEFAULT_PARAMS[v]          # the defaults pass their own checks
        assert REGISTRY[v].formula
    # the backends' capability lists name registered variants only; auto covers every variant on the CPU
    assert set(eager.FAST_VARIANTS) <= set(VARIANTS) and set(flex.FLEX_VARIANTS) <= set(VARIANTS)
    assert {v for (_, v) in dispatch.AUTO_ORDER} <= set(VARIANTS)
    assert {v for (dev, v) in dispatch.AUTO_ORDER if dev == "cpu"} == set(VARIANTS)


@pytest.mark.parametrize("variant,params,message", [
    ("lssar", {"offset": "abc"}, "offset must be a finite number, got 'abc'"),
    ("lssar", {"offset": float("nan")}, "offset must be a finite number"),
    ("lssar", {"offset_until": 2.5}, "offset_until must be an integer >= 0, got 2.5"),
    ("lssar", {"offset_until": True}, "offset_until must be an integer >= 0, got True"),
    ("lssar", {"sharpen_power": float("inf")}, "sharpen_power must be a finite number > 0, got inf"),
    ("lssar", {"sharpen_power": "p"}, "sharpen_power must be a finite number > 0, got 'p'"),
    ("ssmax", {"ssmax_scale": float("nan")}, "ssmax_scale must be a finite number"),
    ("sigmoid", {"log_base": -2}, "log_base must be a finite number > 0 and != 1"),
    (None, {}, "unknown attention variant None; valid choices: softmax"),
])
def test_resolve_params_names_the_bad_value(variant, params, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_params(variant, params)


def test_resolve_params_normalises_values_and_keeps_tensors():
    got = resolve_params("lssar", {"sharpen_power": 3, "offset": "0.5", "offset_until": 2.0, "log_base": "e"})
    assert got == {"sharpen_power": 3.0, "offset": 0.5, "offset_until": 2, "log_base": math.e}
    assert type(got["offset_until"]) is int and type(got["sharpen_power"]) is float
    c = torch.tensor([0.5, 2.0], requires_grad=True)
    assert resolve_params("ssmax", {"ssmax_scale": c})["ssmax_scale"] is c      # learnable: passed through


def _count_resolves(monkeypatch):
    """Count resolve_params calls wherever the attention package imported it."""
    from gravprobe.attention import dispatch, eager, flex, layer, reference

    calls = []
    real = reference.resolve_params

    def counting(variant, params=None):
        calls.append(variant)
        return real(variant, params)

    for module in (reference, dispatch, eager, flex, layer):
        if hasattr(module, "resolve_params"):
            monkeypatch.setattr(module, "resolve_params", counting)
    return calls


@pytest.mark.parametrize("variant,backend", [("lssar", "torch"), ("relu", "torch"), ("ssmax", "torch"),
                                             ("lssa", "flex")])
def test_attend_resolves_params_once(variant, backend, monkeypatch):
    """attend resolves once; the backend (eager, its reference fallback, flex) takes the result as given."""
    from gravprobe.attention import flex

    if backend == "flex":
        if not flex.flex_available():
            pytest.skip("torch without FlexAttention")
        monkeypatch.setenv(flex.COMPILE_ENV, "0")       # the unfused eager FlexAttention (float64 on the CPU)
    calls = _count_resolves(monkeypatch)
    q, k, v = _qkv(B=1, T=6, H=2, D=4, seed=30)
    out = attend(q, k, v, variant, backend=backend)
    assert calls == [variant]
    calls.clear()
    torch.testing.assert_close(out, reference_attention(q, k, v, variant))
    assert calls == [variant]                            # the public reference resolves once too


def test_layer_resolves_params_at_construction_only(monkeypatch):
    from gravprobe.attention import CausalSelfAttention

    calls = _count_resolves(monkeypatch)
    torch.manual_seed(0)
    for variant in ("lssar", "ssmax", "relu"):
        layer = CausalSelfAttention(16, 2, variant, backend="torch")
        assert calls == [variant]
        calls.clear()
        x = torch.randn(2, 5, 16)
        layer(x).sum().backward()
        layer.attention_weights(x)
        assert calls == [], f"{variant}: the forward pass resolved its parameters again"


def test_eager_lssar_identical_keys_take_the_uniform_limit_for_every_draw():
    """Identical keys make each stage-1 row uniform up to rounding; the fast path's row maximum (from the
    largest score) can then be rounding noise with every w = 0: it must return the reference's uniform row,
    not 0/0 (about 4 % of random draws did, seeds 0, 32 and 46 among them)."""
    from gravprobe.attention import eager

    T = 9
    q0, _, v0 = _qkv(B=1, T=T, H=2, D=3, seed=22)
    q0[0, 5, 0] = 0.0
    uniform = torch.cumsum(v0, 1) / torch.arange(1, T + 1, dtype=torch.float64)[None, :, None, None]
    for seed in (0, 32, 46, 131, 132, *range(1, 8)):
        k0 = torch.randn(1, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        q, k, v = (t.detach().clone().requires_grad_() for t in (q0, k0.expand(1, T, 2, 3).contiguous(), v0))
        got = eager.eager_attention(q, k, v, "lssar")
        torch.testing.assert_close(got, uniform, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")
        torch.testing.assert_close(got, reference_attention(q, k, v, "lssar"), rtol=1e-12, atol=1e-12)
        # the q/k gradients of a near-uniform row are rounding noise amplified by p, in the reference too
        # (README "near-uniform rows"): only required finite here; dv is exact
        dq, dk, dv = torch.autograd.grad(got.square().sum(), (q, k, v))
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all(), f"seed {seed}"
        vv = v0.clone().requires_grad_()
        mean = torch.cumsum(vv, 1) / torch.arange(1, T + 1, dtype=torch.float64)[None, :, None, None]
        torch.testing.assert_close(dv, torch.autograd.grad(mean.square().sum(), vv)[0], rtol=1e-10, atol=1e-12)
