"""Fused Triton kernels (gravprobe.kernels) vs the plain-PyTorch reference (gravprobe.attention).

Without CUDA the kernels run in Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton); those tests use small shapes. Tests marked ``gpu``
repeat the comparison at full scale (T up to 4K, bfloat16) with the tolerance set relative to the
reference's own bfloat16 error; ``slow`` ones are long in the interpreter.

Every kernel output is allocated NaN-filled in interpreter mode (``ops.POISON_OUTPUTS``), so an element a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from gravprobe.attention import attend, reference_attention

from gravprobe import kernels

pytestmark = [
    pytest.mark.skipif(not kernels.is_available(), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"),
    # the interpreter evaluates masked-off lanes with numpy too (e.g. x^p of a padded row), which warns;
    # those lanes are discarded by tl.where and the tests check every result for NaN/inf
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

from gravprobe.kernels import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
VARIANTS = kernels.SUPPORTED_VARIANTS
# float32 kernel vs float64 reference (relative RMS); lssar amplifies the rounding of nᵢaᵢⱼ − 1 by p
TOL_FP32 = {"softplus": 2e-5, "lssa": 2e-5, "lssar": 2e-4}


def rel_rms(x: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """‖x − ref‖_rms / max(‖ref‖_rms, floor)."""
    x, ref = x.double(), ref.double()
    err = (x - ref).pow(2).mean().sqrt().item()
    scale = max(ref.pow(2).mean().sqrt().item(), floor)
    return err / scale if scale > 0 else err


def make_inputs(B, T, H, D, dtype=torch.float32, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen) for _ in range(4))
    q = (q * 1.5).to(device=device, dtype=dtype)  # a spread of scores, so weights are far from uniform
    k = k.to(device=device, dtype=dtype)
    v = v.to(device=device, dtype=dtype)
    return q, k, v, do.to(device=device, dtype=dtype)


def kernel_and_grads(q, k, v, do, variant, causal=True, **params):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = kernels.fused_attention(q, k, v, variant, causal=causal, **params)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), grads


def reference_and_grads(q, k, v, do, variant, causal=True, dtype=torch.float64, **params):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, variant, causal=causal, **params)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return out.detach(), grads


def assert_matches_reference(variant, B, T, H, D, causal=True, seed=0, tol=None, **params):
    q, k, v, do = make_inputs(B, T, H, D, seed=seed)
    out, grads = kernel_and_grads(q, k, v, do, variant, causal, **params)
    ref, ref_grads = reference_and_grads(q, k, v, do, variant, causal, **params)
    tol = tol or TOL_FP32[variant]
    assert torch.isfinite(out).all(), "kernel output has NaN/inf (an unwritten element?)"
    errors = {"out": rel_rms(out, ref)}
    # a gradient that is exactly 0 in the reference (dq, dk at T = 1: one key, weight 1 whatever the
    # score) is compared with an error floor of 5 % of dv's scale instead
    floor = 0.05 * ref_grads[2].double().pow(2).mean().sqrt().item()
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(g).all(), f"{name} has NaN/inf (an unwritten element?)"
        errors[name] = rel_rms(g, rg, floor=floor)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{variant} B{B} T{T} H{H} D{D} causal={causal}: relative RMS errors {errors} > {tol}"


# --------------------------------------------------------------------------------------------------
# interpreter-sized correctness (also run on GPUs)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [16, 40, 64])
@pytest.mark.parametrize("T", [1, 15, 63, 100])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_matches_reference(variant, T, D):
    B, H = (1, 2) if (T + D) % 2 else (2, 1)  # alternate batch/head layouts across the grid
    assert_matches_reference(variant, B, T, H, D, seed=T * 1000 + D)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_matches_reference_non_causal(variant):
    assert_matches_reference(variant, 2, 37, 2, 24, causal=False)


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("variant", ["lssa", "lssar"])
def test_block_boundaries(variant, blocks, monkeypatch):
    """Many and unequal query/key blocks exercise the causal start of the dK/dV loop and the tail masks."""
    monkeypatch.setattr(ops, "BLOCK_OVERRIDE", blocks)
    assert_matches_reference(variant, 1, 50, 1, 16)


@pytest.mark.parametrize("variant,params", [
    ("lssa", {"log_base": 10.0}),
    ("lssar", {"sharpen_power": 3.0, "offset_until": 0, "log_base": 2.0}),
    ("lssar", {"sharpen_power": 32.0, "offset": 0.5, "offset_until": 5}),
    ("lssar", {"sharpen_power": 1.0}),
    ("lssar", {"sharpen_power": 2.5}),  # non-integer: exp2(p·log2 x) instead of repeated squaring
])
def test_kernel_matches_reference_with_params(variant, params):
    assert_matches_reference(variant, 1, 40, 2, 32, **params)


@pytest.mark.parametrize("variant", ["softplus", "lssar"])
def test_extreme_scores(variant):
    """Scores of ±50 and beyond: softplus's tails (e^s for s ≪ 0, s for s ≫ 0) and sharp lssar rows."""
    q, k, v, do = make_inputs(1, 40, 1, 16, seed=3)
    q = q * 12.0
    out, grads = kernel_and_grads(q, k, v, do, variant)
    ref, ref_grads = reference_and_grads(q, k, v, do, variant)
    assert rel_rms(out, ref) < TOL_FP32[variant]
    for g, rg in zip(grads, ref_grads):
        assert rel_rms(g, rg, floor=1e-6) < TOL_FP32[variant]


def test_lssar_with_power_one_and_no_offset_is_lssa():
    q, k, v, _ = make_inputs(1, 30, 2, 16)
    a = kernels.fused_attention(q, k, v, "lssar", sharpen_power=1.0, offset=0.0)
    b = kernels.fused_attention(q, k, v, "lssa")
    assert rel_rms(a, b) < 1e-5


def test_lssar_uniform_row_returns_the_uniform_limit():
    """All keys equal ⇒ every stage-1 row is uniform ⇒ every ReLU(nᵢaᵢⱼ − 1) is 0 ⇒ the mean of the
    visible values (rows i ≤ 3, with oᵢ = 0, keep their uniform stage-1 weights too)."""
    B, T, H, D = 1, 20, 1, 16
    q, _, v, _ = make_inputs(B, T, H, D)
    k = torch.randn(1, 1, 1, D, device=DEVICE).expand(B, T, H, D).contiguous()
    out = kernels.fused_attention(q, k, v, "lssar")
    uniform = v.cumsum(1) / torch.arange(1, T + 1, device=DEVICE).view(1, T, 1, 1)
    assert rel_rms(out, uniform) < 1e-5


def test_lssar_all_weights_zero_rows_and_their_gradients():
    """With oᵢ = 1.5 and nearly equal keys, every row past offset_until has all wᵢⱼ = 0: the output is the
    uniform limit, dq/dk get nothing from those rows and dv = dO/nᵢ — as in the reference. (At an exactly
    uniform row with oᵢ = 1 the gradient of the definition is singular: ∂a′/∂u ~ p/(W·M) with M → 0.)"""
    B, T, H, D = 1, 24, 2, 16
    q, k, v, do = make_inputs(B, T, H, D)
    k = k.mean(1, keepdim=True) + 1e-3 * k
    params = {"offset": 1.5}
    out, grads = kernel_and_grads(q, k, v, do, "lssar", **params)
    uniform = v.cumsum(1) / torch.arange(1, T + 1, device=DEVICE).view(1, T, 1, 1)
    assert rel_rms(out[:, 3:], uniform[:, 3:]) < 1e-5
    ref, ref_grads = reference_and_grads(q, k, v, do, "lssar", **params)
    assert rel_rms(out, ref) < TOL_FP32["lssar"]
    for g, rg in zip(grads, ref_grads):
        assert rel_rms(g, rg) < TOL_FP32["lssar"]


def test_causality_future_keys_change_nothing():
    q, k, v, _ = make_inputs(1, 40, 2, 16)
    out = kernels.fused_attention(q, k, v, "lssar")
    k2, v2 = k.clone(), v.clone()
    k2[:, 25:] = torch.randn_like(k2[:, 25:])
    v2[:, 25:] = 100.0
    out2 = kernels.fused_attention(q, k2, v2, "lssar")
    torch.testing.assert_close(out[:, :25], out2[:, :25], rtol=0, atol=0)
    assert not torch.allclose(out[:, 25:], out2[:, 25:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_within_twice_the_reference_error(variant, dtype):
    check_low_precision(variant, 2, 48, 2, 32, dtype)


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(1, 40, 2, 16)
    _, g1 = kernel_and_grads(q, k, v, do, "lssar")
    _, g2 = kernel_and_grads(q, k, v, do, "lssar")
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    """q, k, v as views into one packed [B, T, 3, H, D] projection, as an attention layer makes them."""
    B, T, H, D = 2, 33, 2, 24
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, device=DEVICE)
    out, grads = kernel_and_grads(q, k, v, do, "lssar")
    ref, ref_grads = reference_and_grads(q, k, v, do, "lssar")
    assert rel_rms(out, ref) < TOL_FP32["lssar"]
    for g, rg in zip(grads, ref_grads):
        assert rel_rms(g, rg) < TOL_FP32["lssar"]


def test_outputs_are_nan_poisoned_in_interpreter_mode():
    if CUDA:
        pytest.skip("poisoning is an interpreter-mode (test) setting")
    assert ops.POISON_OUTPUTS
    q, k, v, _ = make_inputs(1, 5, 1, 16)
    out, *_ = ops._forward_impl(q, k, v, None, None, "softplus", True, 15.0, 1.0, 3, math.e)
    assert torch.isfinite(out).all()
    assert torch.isnan(ops._alloc((2,), torch.float32, q.device)).all()


def test_dispatch_runs_the_kernels():
    q, k, v, _ = make_inputs(1, 17, 2, 16)
    a = attend(q, k, v, "lssar", backend="triton")
    b = attend(q, k, v, "lssar", backend="torch")
    assert rel_rms(a, b) < TOL_FP32["lssar"]


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v, do = make_inputs(1, 20, 2, 16)

    def f(q, k, v):
        return kernels.fused_attention(q, k, v, "lssar") * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
    out_c = compiled(qc, kc, vc)
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), do)
    out_e, grads_e = kernel_and_grads(q, k, v, 2.0 * do, "lssar")
    torch.testing.assert_close(out_c, 2.0 * out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)


def test_autograd_function_fallback_matches_custom_op():
    """``TwoStageAttention`` (used on torch without ``torch.library.custom_op``) gives the same numbers."""
    q, k, v, do = make_inputs(1, 21, 2, 16)
    qs, ks = ops._inverse_norms(q), ops._inverse_norms(k)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, qs, ks)]
    out = ops.TwoStageAttention.apply(*leaves, "lssar", True, 15.0, 1.0, 3, math.e)
    grads = torch.autograd.grad(out, leaves, do)
    leaves_op = [t.clone().requires_grad_() for t in (q, k, v, qs, ks)]
    out_op = ops._attention_op(*leaves_op, "lssar", True, 15.0, 1.0, 3, math.e)[0]
    grads_op = torch.autograd.grad(out_op, leaves_op, do)
    assert torch.equal(out, out_op)
    for a, b in zip(grads, grads_op):
        assert torch.equal(a, b)


def test_custom_op_registration_passes_opcheck():
    q, k, v, _ = make_inputs(1, 9, 1, 16)
    qs, ks = ops._inverse_norms(q), ops._inverse_norms(k)
    for t in (q, k, v, qs, ks):
        t.requires_grad_()
    torch.library.opcheck(ops._attention_op, (q, k, v, qs, ks, "lssar", True, 15.0, 1.0, 3, math.e),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("call,error", [
    (lambda q: kernels.fused_attention(q, q, q, "softmax"), ValueError),
    (lambda q: kernels.fused_attention(q, q, q, "lssar", sharpen_powr=3), TypeError),
    (lambda q: kernels.fused_attention(q, q, q, "lssar", sharpen_power=0), ValueError),
    (lambda q: kernels.fused_attention(q.double(), q.double(), q.double(), "lssa"), TypeError),
    (lambda q: kernels.fused_attention(q[..., 0], q[..., 0], q[..., 0], "lssa"), ValueError),
])
def test_bad_input_raises_a_clear_error(call, error):
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(error):
        call(q)


def test_kernel_defaults_and_checks_are_the_registrys():
    """lssar's defaults are stated once, in gravprobe.attention.reference.REGISTRY; the kernels read them."""
    from gravprobe.attention import DEFAULT_PARAMS, VARIANTS

    assert set(VARIANTS) >= set(kernels.SUPPORTED_VARIANTS) and ops.SUPPORTED_VARIANTS is kernels.SUPPORTED_VARIANTS
    union = {name: value for v in kernels.SUPPORTED_VARIANTS for name, value in DEFAULT_PARAMS[v].items()}
    assert ops.PARAM_DEFAULTS == union == {"sharpen_power": 15.0, "offset": 1.0, "offset_until": 3,
                                           "log_base": math.e}
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    for params, message in (({"sharpen_power": 0}, "fused_attention: sharpen_power must be a finite number > 0"),
                            ({"log_base": 1}, "fused_attention: log_base must be"),
                            ({"offset_until": -1}, "fused_attention: offset_until must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            kernels.fused_attention(q, q, q, "lssar", **params)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['p'\]; valid: \['log_base', 'offset'"):
        kernels.fused_attention(q, q, q, "lssar", p=3)


def test_supports_predicate():
    assert kernels.supports("lssar", dtype=torch.bfloat16, head_dim=128, causal=True)
    assert kernels.supports("lssa", dtype=torch.float32, head_dim=40, causal=False)
    assert not kernels.supports("softmax", dtype=torch.float32, head_dim=64)
    assert not kernels.supports("lssa", dtype=torch.float64, head_dim=64)
    assert not kernels.supports("lssa", dtype=torch.float32, head_dim=129)


# --------------------------------------------------------------------------------------------------
# low precision: tolerance relative to the reference's own error in the same dtype
# --------------------------------------------------------------------------------------------------

def check_low_precision(variant, B, T, H, D, dtype, factor=None, seed=0, **params):
    """Kernel(dtype) vs reference(float32) must be within ``factor`` × reference(dtype) vs reference(float32),
    for the output and for dq, dk, dv (plus a floor of 0.1 ulp for near-exact cases).

    ``factor`` is 2 on GPUs. In Triton's interpreter it is 3 for bfloat16, whose float32 → bfloat16
    stores truncate instead of rounding to nearest (measured there: kernel error 2.0–2.3 × the reference's
    although every operation runs in float32 — the truncation alone doubles the error)."""
    if factor is None:
        factor = 3.0 if (dtype == torch.bfloat16 and not CUDA) else 2.0
    q, k, v, do = make_inputs(B, T, H, D, dtype=dtype, seed=seed)
    out, grads = kernel_and_grads(q, k, v, do, variant, **params)
    ref32, ref32_grads = reference_and_grads(q, k, v, do, variant, dtype=torch.float32, **params)
    q_, k_, v_ = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_lp = reference_attention(q_, k_, v_, variant, **params)
    ref_lp_grads = torch.autograd.grad(ref_lp, (q_, k_, v_), do)
    floor = 0.1 * torch.finfo(dtype).eps
    for name, x, x_lp, x32 in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_lp, *ref_lp_grads),
                                  (ref32, *ref32_grads)):
        assert torch.isfinite(x).all(), f"{name} has NaN/inf"
        err = rel_rms(x, x32)
        ref_err = rel_rms(x_lp, x32)
        assert err <= factor * ref_err + floor, f"{variant} {dtype} {name}: kernel {err:.3g} vs reference {ref_err:.3g}"


# --------------------------------------------------------------------------------------------------
# GPU scale
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1000, 4096])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_bf16_full_scale(variant, T, D):
    check_low_precision(variant, 1, T, 2, D, torch.bfloat16, seed=T + D)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_fp32_full_scale(variant):
    assert_matches_reference(variant, 1, 2048, 2, 64, tol=10 * TOL_FP32[variant])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("power", [15.0, 32.0])
def test_gpu_lssar_16k_bf16_is_finite(power):
    check_lssar_16k_finite(power, block=None)


def check_lssar_16k_finite(power, block):
    T = 16384
    q, k, v, do = make_inputs(1, T, 1, 64 if CUDA else 16, dtype=torch.bfloat16)
    q = q * 4.0  # sharp rows: large nᵢaᵢⱼ, the overflow case of METHOD.md §2
    out, grads = kernel_and_grads(q, k, v, do, "lssar", sharpen_power=power)
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    # spot-check the last rows against the formula evaluated for them alone (the full T×T is 1 GiB/head)
    rows = torch.arange(T - 8, T)
    assert rel_rms(out[0, rows, 0], lssar_rows(q[0, :, 0], k[0, :, 0], v[0, :, 0], rows, power)) < 0.05


def lssar_rows(q, k, v, rows, power, offset=1.0, offset_until=3):
    """METHOD.md §2 lssar output for the given 0-based query rows of one head, float64, causal."""
    q, k, v = (t.double() for t in (q, k, v))
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    out = []
    for i in rows.tolist():
        n = i + 1
        s = math.log(q.shape[-1]) * math.log(n) * (kn[:n] @ qn[i])
        a = torch.nn.functional.softplus(s)
        a = a / a.sum()
        r = torch.relu(n * a - (0.0 if n <= offset_until else offset))
        w = (r / r.max()) ** power
        out.append((w / w.sum()) @ v[:n])
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="the GPU variant is test_gpu_lssar_16k_bf16_is_finite")
def test_interpreter_lssar_16k_bf16_is_finite(monkeypatch):
    monkeypatch.setattr(ops, "BLOCK_OVERRIDE", (512, 512))  # few, large tiles: fast in the interpreter
    check_lssar_16k_finite(32.0, block=(512, 512))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_matches_reference_T1000(variant):
    assert_matches_reference(variant, 1, 1000, 1, 40)
