"""The ``flex`` backend (attention/flex.py) against the reference; dispatch of ``flex`` and ``auto``.

On the CPU FlexAttention runs forward only; these tests use its unfused eager path
(``GRAVPROBE_FLEX_COMPILE=0``: no compilation, seconds per call). Gradients are checked on CUDA only
(``pytest -m gpu``), compiled, as in training.
"""
from __future__ import annotations

import logging

import gravprobe.attention as A
import pytest
import torch
from gravprobe.attention import dispatch, flex, reference_attention

pytestmark = pytest.mark.skipif(not flex.flex_available(), reason="torch without FlexAttention")
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    if not CUDA:
        monkeypatch.setenv(flex.COMPILE_ENV, "0")
    dispatch._reset()
    yield
    dispatch._reset()


def _qkv(B=2, T=13, H=2, D=8, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, D, generator=g, dtype=dtype).to(device) for _ in range(3))


def _check(variant, params, causal, window, seed=1):
    q, k, v = _qkv(seed=seed)
    got = A.attend(q, k, v, variant, causal=causal, window=window, backend="flex", **params)
    assert A.active_backend() == "flex"
    want = reference_attention(q, k, v, variant, causal=causal, window=window, **params)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# The unfused eager FlexAttention takes ~1 s per call on one CPU core: one case per variant here, the
# full matrix under -m slow.
@pytest.mark.parametrize("variant,params,causal,window", [
    ("softmax", {}, False, None), ("softplus", {}, True, None), ("lssa", {}, True, 4),
    ("lssar", {"sharpen_power": 2.0, "offset": 0.5, "offset_until": 1, "log_base": 10.0}, True, 4),
])
def test_flex_forward_matches_reference(variant, params, causal, window):
    _check(variant, params, causal, window)


@pytest.mark.slow
@pytest.mark.parametrize("variant,params", [
    ("softmax", {}), ("softplus", {}), ("lssa", {}), ("lssar", {}), ("lssar", {"sharpen_power": 3.0}),
])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 4), (False, None)])
def test_flex_forward_matches_reference_full(variant, params, causal, window):
    _check(variant, params, causal, window, seed=2)


@pytest.mark.slow
def test_flex_float32_and_awkward_lengths():
    for T, window in ((1, None), (5, 1), (29, 2), (29, 40)):
        q, k, v = _qkv(B=1, T=T, H=1, D=4, seed=T, dtype=torch.float32)
        for variant in flex.FLEX_VARIANTS:
            got = flex.flex_attend(q, k, v, variant, window=window)
            want = reference_attention(q.double(), k.double(), v.double(), variant, window=window)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_flex_lssar_uniform_rows_take_the_limit():
    q, _, v = _qkv(B=1, T=9, H=1, D=3, seed=3)
    k = torch.randn(1, 1, 1, 3, dtype=torch.float64).expand(1, 9, 1, 3).contiguous()   # identical keys
    got = flex.flex_attend(q, k, v, "lssar", offset=100.0, offset_until=0)             # every w = 0
    torch.testing.assert_close(got, reference_attention(q, k, v, "lssar", offset=100.0, offset_until=0))


def test_flex_dispatch_rules(caplog):
    q, k, v = _qkv(B=1, T=6, H=1, D=4, seed=4)
    with pytest.raises(ValueError, match="flex backend implements"):
        flex.flex_attend(q, k, v, "relu")
    with pytest.raises(A.BackendUnavailableError, match="flex.*implements"):
        A.attend(q, k, v, "ssmax", backend="flex")
    if not CUDA:
        qg = q.clone().requires_grad_()
        with pytest.raises(A.BackendUnavailableError, match="no backward on the CPU"):
            A.attend(qg, k, v, "lssa", backend="flex")
        with torch.no_grad():                      # inference on the CPU is fine
            A.attend(qg, k, v, "lssa", backend="flex")
    with caplog.at_level(logging.INFO, logger="gravprobe.attention.dispatch"):
        A.attend(q, k, v, "lssa")
    assert A.active_backend() == "torch"           # the CPU's measured choice
    assert any("auto -> torch for lssa on cpu" in r.getMessage() for r in caplog.records)
    with A.backend_override("flex"):
        A.attend(q, k, v, "lssa")
    assert A.active_backend() == "flex"


def test_layer_with_flex_backend_forward():
    torch.manual_seed(0)
    ref = A.CausalSelfAttention(16, 2, "lssar", backend="torch", window=3).double()
    fl = A.CausalSelfAttention(16, 2, "lssar", backend="flex", window=3).double()
    fl.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fl(x), ref(x), rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", flex.FLEX_VARIANTS)
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_flex_forward_backward_matches_reference(variant, window):
    q, k, v = (t.float().requires_grad_() for t in _qkv(B=2, T=512, H=2, D=64, seed=5, device="cuda"))
    got = A.attend(q, k, v, variant, window=window, backend="flex")
    want = reference_attention(q.double(), k.double(), v.double(), variant, window=window)
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-4)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g.double())):
        torch.testing.assert_close(a.double(), b, rtol=5e-3, atol=5e-4)
