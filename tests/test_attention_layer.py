"""The attention layer (projections, RoPE, ssmax scale, config) and the backend dispatch."""
from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import gravprobe.attention as A
from gravprobe.attention import (
    VARIANTS,
    BackendUnavailableError,
    CausalSelfAttention,
    RotaryEmbedding,
    attend,
    backend_override,
)
from gravprobe.attention import dispatch

CONF = Path(A.__file__).resolve().parent.parent / "conf" / "attention"


def _x(B=2, T=11, C=32, seed=0):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


# --- the layer -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_layer_shapes_any_length_and_causality(variant):
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, variant, backend="torch")
    for T in (1, 2, 17):
        y = layer(_x(T=T))
        assert y.shape == (2, T, 32) and torch.isfinite(y).all()
    x = _x(T=13)
    x2 = x.clone()
    x2[:, 8:] = torch.randn_like(x2[:, 8:])
    y, y2 = layer(x), layer(x2)
    assert torch.equal(y[:, :8], y2[:, :8])
    assert not torch.allclose(y[:, 8:], y2[:, 8:])


def test_layer_matches_manual_composition():
    torch.manual_seed(1)
    layer = CausalSelfAttention(24, 3, "lssar", params={"sharpen_power": 3}, rope=False, bias=True)
    x = _x(T=9, C=24)
    q, k, v = layer.qkv(x).view(2, 9, 3, 3, 8).unbind(2)
    want = layer.out(attend(q, k, v, "lssar", sharpen_power=3, backend="torch").reshape(2, 9, 24))
    torch.testing.assert_close(layer(x), want)
    assert layer.rotary is None and layer.qkv.bias is not None


def test_layer_gradients_reach_every_parameter_and_ssmax_scale_is_learnable():
    torch.manual_seed(2)
    layer = CausalSelfAttention(32, 4, "ssmax")
    assert layer.ssmax_scale.shape == (4,) and torch.equal(layer.ssmax_scale.detach(), torch.ones(4))
    layer(_x()).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "ssmax_scale" in layer.state_dict()
    assert not any("cos" in k or "sin" in k for k in layer.state_dict())   # RoPE tables are not saved
    assert not hasattr(CausalSelfAttention(32, 4, "lssar"), "ssmax_scale")
    init = CausalSelfAttention(32, 4, "ssmax", params={"ssmax_scale": 0.5})
    assert torch.equal(init.ssmax_scale.detach(), torch.full((4,), 0.5))


def test_ssmax_scale_changes_the_output():
    torch.manual_seed(3)
    layer = CausalSelfAttention(16, 2, "ssmax", rope=False)
    x = _x(T=10, C=16)
    y1 = layer(x)
    with torch.no_grad():
        layer.ssmax_scale.fill_(3.0)
    assert not torch.allclose(y1, layer(x))


def test_rope_scores_depend_only_on_relative_position():
    D, T = 16, 40
    rope = RotaryEmbedding(D)
    g = torch.Generator().manual_seed(4)
    qv, kv = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    q = qv.expand(1, T, 1, D).float()
    k = kv.expand(1, T, 1, D).float()
    qr, kr = rope(q, k)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))                   # rotations
    s = torch.einsum("bihd,bjhd->ij", qr, kr)
    for offset in (-7, 0, 3, 20):
        diag = torch.diagonal(s, offset=offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.diagonal(s, 0)[0], torch.diagonal(s, 3)[0])  # positions do matter
    torch.testing.assert_close(qr[:, 0], q[:, 0])                                  # position 0: identity


def test_rope_cache_grows_and_is_consistent():
    rope = RotaryEmbedding(8)
    q = torch.randn(1, 50, 2, 8)
    a5 = rope(q[:, :5], q[:, :5])[0]
    a50 = rope(q, q)[0]
    assert rope.cos.shape[0] >= 50
    torch.testing.assert_close(rope(q[:, :5], q[:, :5])[0], a5)
    torch.testing.assert_close(a50[:, :5], a5)


def test_layer_construction_errors():
    with pytest.raises(ValueError, match="valid choices: softmax, softplus, lssa, lssar, relu, sigmoid, ssmax"):
        CausalSelfAttention(32, 4, "two_stage")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        CausalSelfAttention(30, 4, "lssar")
    with pytest.raises(ValueError, match="even head dim"):
        CausalSelfAttention(12, 4, "lssar")
    CausalSelfAttention(12, 4, "lssar", rope=False)                                # fine without RoPE
    with pytest.raises(ValueError, match="unknown parameter"):
        CausalSelfAttention(32, 4, "lssar", params={"p": 15})
    with pytest.raises(ValueError, match="backend"):
        CausalSelfAttention(32, 4, "lssar", backend="flash")
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        CausalSelfAttention(32, 4, "lssar")(torch.randn(2, 5, 16))


# --- config ---------------------------------------------------------------------------------------------

def test_every_config_file_builds_its_variant():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= set(VARIANTS)          # one file per variant, plus named study arms
    for f in files:
        node = OmegaConf.load(f)
        assert set(node) == {"name", "params", "backend", "window"} and node.name in VARIANTS
        layer = CausalSelfAttention.from_config(node, 32, 4)
        assert layer.variant == node.name and layer.backend == "auto" and layer.window == node.window
        if f.stem in VARIANTS:
            assert node.name == f.stem and node.window is None
        assert layer(_x(T=5)).shape == (2, 5, 32)
    lssar = CausalSelfAttention.from_config(OmegaConf.load(CONF / "lssar.yaml"), 32, 4)
    assert lssar.params == {"sharpen_power": 15.0, "offset": 1.0, "offset_until": 3,
                            "log_base": pytest.approx(2.718281828459045)}


def test_every_registry_variant_has_the_config_file_generated_from_it():
    """One source of truth: conf/attention/<variant>.yaml is the registry's entry, written out."""
    from gravprobe.attention import REGISTRY, resolve_params
    from gravprobe.attention.config_files import conf_dir, stale_files, variant_yaml

    assert conf_dir().resolve() == CONF.resolve()
    stale = stale_files(CONF)
    assert not stale, (f"{[p.name for p in stale]} differ from gravprobe.attention.reference.REGISTRY; run "
                       f"`python -m gravprobe.attention.config_files --write`")
    for name, spec in REGISTRY.items():
        node = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        assert node["name"] == name and node["window"] is None and node["backend"] == "auto"
        assert list(node["params"]) == [p.name for p in spec.params]                # every param, in order
        assert resolve_params(name, node["params"]) == spec.defaults                  # at its default
        assert spec.formula in variant_yaml(name)


def test_study_arm_files_name_a_registered_variant_and_list_its_params():
    from gravprobe.attention import REGISTRY, resolve_params

    arms = [f for f in sorted(CONF.glob("*.yaml")) if f.stem not in REGISTRY]
    assert {f.stem for f in arms} >= {"lssar_p3", "softmax_window4"}
    for f in arms:
        node = OmegaConf.to_container(OmegaConf.load(f))
        spec = REGISTRY[node["name"]]
        assert sorted(node["params"]) == sorted(p.name for p in spec.params), f.name
        resolve_params(spec.name, node["params"])
    assert OmegaConf.load(CONF / "lssar_p3.yaml").params.sharpen_power == 3


def test_config_files_tool_reports_and_rewrites_a_stale_file(tmp_path, capsys):
    from gravprobe.attention import config_files

    for f in CONF.glob("*.yaml"):
        (tmp_path / f.name).write_text(f.read_text())
    lssar = tmp_path / "lssar.yaml"
    lssar.write_text(lssar.read_text().replace("sharpen_power: 15", "sharpen_power: 12"))
    (tmp_path / "relu.yaml").unlink()
    assert config_files.main(["--dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "lssar.yaml" in out and "relu.yaml" in out and "--write" in out and "lssar_p3" not in out
    assert config_files.main(["--dir", str(tmp_path), "--write"]) == 0
    assert config_files.stale_files(tmp_path) == []
    assert "sharpen_power: 15" in lssar.read_text()
    assert (tmp_path / "lssar_p3.yaml").read_text() == (CONF / "lssar_p3.yaml").read_text()   # arms untouched


def test_a_new_variant_is_one_registry_entry(monkeypatch):
    """A throwaway variant with a learnable parameter, registered and nothing else: attend, the layer (its
    parameter learnable per head), from_config and its generated config file all work."""
    import math

    from gravprobe.attention import REGISTRY, Param, Variant, reference
    from gravprobe.attention.config_files import variant_yaml

    def relu_power(q, k, n, visible, *, relu_power, gain):
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
        return (torch.relu(s).pow(relu_power) * reference._ssmax_scale(gain, q.shape[2], q.dtype, q.device)
                / n).masked_fill(~visible, 0.0)

    spec = Variant("relu_power", relu_power, (
        Param("relu_power", 2.0, reference._positive("relu_power"), "exponent"),
        Param("gain", 1.0, reference._scale, "initial per-head gain", learnable=True),
    ), "gain ReLU(s_ij)^relu_power / n_i", normalised=False)
    monkeypatch.setitem(REGISTRY, "relu_power", spec)
    q, k, v = torch.randn(3, 1, 5, 2, 4, dtype=torch.float64).unbind(0)
    out = attend(q, k, v, "relu_power", relu_power=3)
    torch.testing.assert_close(out, A.reference_attention(q, k, v, "relu_power", relu_power=3.0, gain=1.0))
    with pytest.raises(ValueError, match="relu_power must be a finite number > 0"):
        attend(q, k, v, "relu_power", relu_power=0)
    node = OmegaConf.create(variant_yaml("relu_power"))
    assert node.params == {"relu_power": 2, "gain": 1}
    layer = CausalSelfAttention.from_config(node, 16, 2)
    assert layer.gain.shape == (2,) and "gain" in layer.state_dict() and layer.params == {"relu_power": 2.0}
    layer(_x(T=6, C=16)).square().mean().backward()
    assert layer.gain.grad is not None and layer.gain.grad.abs().sum() > 0


def test_from_config_with_hydra_compose():
    from hydra import compose, initialize_config_module

    with initialize_config_module("gravprobe.conf", version_base=None):
        cfg = compose("config", overrides=["attention=lssar", "attention.params.sharpen_power=3"])
    layer = CausalSelfAttention.from_config(cfg.attention, 32, 4, rope=False)
    assert layer.params["sharpen_power"] == 3.0 and layer.rotary is None


def test_from_config_accepts_dicts_and_names_and_rejects_mistakes():
    assert CausalSelfAttention.from_config("softmax", 16, 2).variant == "softmax"
    layer = CausalSelfAttention.from_config({"name": "lssar", "params": {"sharpen_power": 3}}, 16, 2,
                                            rope_base=500.0, bias=True)
    assert layer.params["sharpen_power"] == 3.0 and layer.rotary.base == 500.0 and layer.out.bias is not None
    assert CausalSelfAttention.from_config({"name": "relu", "params": None}, 16, 2).params == {}
    with pytest.raises(ValueError, match="valid choices: softmax, softplus, lssa, lssar, relu, sigmoid, ssmax"):
        CausalSelfAttention.from_config({"name": "lsar"}, 16, 2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['power'\]"):
        CausalSelfAttention.from_config({"name": "lssar", "power": 3}, 16, 2)
    with pytest.raises(ValueError, match="needs a 'name'"):
        CausalSelfAttention.from_config({"params": {}}, 16, 2)
    with pytest.raises(ValueError, match="sharpen_power"):
        CausalSelfAttention.from_config({"name": "lssa", "params": {"sharpen_power": 3}}, 16, 2)
    with pytest.raises(ValueError, match="backend"):
        CausalSelfAttention.from_config({"name": "lssa", "backend": "gpu"}, 16, 2)
    with pytest.raises(TypeError, match="mapping"):
        CausalSelfAttention.from_config(3, 16, 2)


def test_window_from_config_and_its_errors():
    from hydra import compose, initialize_config_module

    with initialize_config_module("gravprobe.conf", version_base=None):
        cfg = compose("config", overrides=["attention=softmax", "attention.window=2"])
    layer = CausalSelfAttention.from_config(cfg.attention, 32, 4)
    assert layer.window == 2 and "window=2" in repr(layer)
    x = _x(T=9)
    q, k, v = layer.qkv(x).view(2, 9, 3, 4, 8).unbind(dim=2)
    q, k = layer.rotary(q, k)
    want = layer.out(A.reference_attention(q, k, v, "softmax", window=2).reshape(2, 9, 32))
    torch.testing.assert_close(layer(x), want)
    assert CausalSelfAttention.from_config({"name": "lssa", "window": None}, 16, 2).window is None
    for bad in (0, -1, 2.5, "two"):
        with pytest.raises(ValueError, match=r"attention\.window must be a positive integer"):
            CausalSelfAttention.from_config({"name": "lssa", "window": bad}, 16, 2)
    with pytest.raises(ValueError, match=r"attention\.window"):
        CausalSelfAttention(16, 2, "lssa", window=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window", [None, 1, 3])
def test_layer_attention_weights_reproduce_the_forward(variant, window):
    torch.manual_seed(0)
    layer = CausalSelfAttention(32, 4, variant, window=window).double()
    x = _x(T=10).double()
    a = layer.attention_weights(x)
    assert a.shape == (2, 4, 10, 10) and a.dtype == torch.float64
    assert not a.triu(1).any()
    if window is not None:
        assert not a.tril(-window).any()
    _, _, v = layer.qkv(x).view(2, 10, 3, 4, 8).unbind(dim=2)
    pre = torch.einsum("bhij,bjhd->bihd", a, v).reshape(2, 10, 32)
    torch.testing.assert_close(layer.out(pre), layer(x), rtol=1e-12, atol=1e-12)


# --- dispatch (fallback behaviour; runs everywhere) ------------------------------------------------------

@pytest.fixture
def fake_kernels(monkeypatch):
    """A stand-in gravprobe.kernels that records calls (and runs the reference)."""
    calls = []

    def fused_attention(q, k, v, variant, causal=True, **params):
        calls.append((variant, causal, params))
        return A.reference_attention(q, k, v, variant, causal=causal, **params)

    module = types.SimpleNamespace(fused_attention=fused_attention, SUPPORTED_VARIANTS=("lssa", "lssar"),
                                   is_available=lambda: True)
    dispatch._reset()
    monkeypatch.setattr(dispatch, "_load_kernels", lambda: (module, None))
    yield calls
    dispatch._reset()


@pytest.fixture
def no_kernels(monkeypatch):
    dispatch._reset()
    monkeypatch.setattr(dispatch, "_load_kernels", lambda: (None, "ImportError: no triton here"))
    yield
    dispatch._reset()


def _small():
    return torch.randn(3, 1, 6, 2, 8).unbind(0)


def test_window_falls_back_to_torch_from_triton_and_logs_why(fake_kernels, caplog, monkeypatch):
    q, k, v = _small()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "flex_support", lambda *a, **kw: (False, "no flex in this test"))
    with caplog.at_level(logging.INFO, logger="gravprobe.attention.dispatch"):
        out = A.attend(q, k, v, "lssa", backend="triton", window=2)
        A.attend(q, k, v, "lssa", backend="triton", window=2)
        auto = A.attend(q, k, v, "lssa", window=2)
    assert fake_kernels == [] and A.active_backend() == "torch"
    torch.testing.assert_close(out, A.reference_attention(q, k, v, "lssa", window=2))
    torch.testing.assert_close(auto, out)
    forced = [r for r in caplog.records if "do not implement" in r.getMessage()]
    assert len(forced) == 1 and "window=2" in forced[0].getMessage()
    assert sum("window=2 is set" in r.getMessage() for r in caplog.records) == 1
    A.attend(q, k, v, "lssa")                          # no window: the kernels run again
    assert len(fake_kernels) == 1


def test_forced_triton_without_kernels_raises_a_clear_error(no_kernels, monkeypatch):
    assert not A.triton_available()
    q, k, v = _small()
    with pytest.raises(BackendUnavailableError, match="no triton here.*backend='torch'"):
        attend(q, k, v, "lssa", backend="triton")
    with backend_override("triton"), pytest.raises(BackendUnavailableError):
        attend(q, k, v, "lssa")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailableError):
        attend(q, k, v, "lssa")
    attend(q, k, v, "lssa", backend="torch")          # an explicit argument wins over the environment
    assert A.active_backend() == "torch"


def test_auto_falls_back_to_torch_and_logs_once(no_kernels, caplog):
    q, k, v = _small()
    with caplog.at_level(logging.INFO, logger="gravprobe.attention.dispatch"):
        attend(q, k, v, "lssar")
        attend(q, k, v, "lssar")
    assert A.active_backend() == "torch"
    assert sum("attention backend: torch on device cpu" in r.getMessage() for r in caplog.records) == 1


def test_forced_triton_passes_resolved_params(fake_kernels):
    assert A.triton_available()
    q, k, v = _small()
    out = attend(q, k, v, "lssar", backend="triton", sharpen_power=3)
    assert A.active_backend() == "triton"
    assert fake_kernels == [("lssar", True, {"log_base": pytest.approx(2.718281828459045),
                                             "sharpen_power": 3.0, "offset": 1.0, "offset_until": 3})]
    torch.testing.assert_close(out, attend(q, k, v, "lssar", backend="torch", sharpen_power=3))
    with pytest.raises(BackendUnavailableError, match="do not implement variant 'softmax'"):
        attend(q, k, v, "softmax", backend="triton")
    with pytest.raises(BackendUnavailableError, match="dtype"):
        attend(q.double(), k.double(), v.double(), "lssa", backend="triton")


def test_auto_uses_triton_only_on_cuda(fake_kernels, monkeypatch):
    q, k, v = _small()
    attend(q, k, v, "lssa")
    assert A.active_backend() == "torch" and fake_kernels == []
    with backend_override("triton"):
        attend(q, k, v, "lssa")
    assert A.active_backend() == "triton" and len(fake_kernels) == 1
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    attend(q, k, v, "lssa")
    assert len(fake_kernels) == 2
    with backend_override("torch"):                    # the context manager beats the environment
        attend(q, k, v, "lssa")
    assert A.active_backend() == "torch" and len(fake_kernels) == 2


def test_bad_override_values(monkeypatch):
    with pytest.raises(ValueError, match="valid choices: auto, torch, triton"):
        with backend_override("cuda"):
            pass
    q, k, v = _small()
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="GRAVPROBE_ATTENTION_BACKEND"):
        attend(q, k, v, "lssa")


# --- kernel vs reference through attend (skipped where gravprobe.kernels cannot run) ---------------------

def _kernels_usable() -> bool:
    dispatch._reset()
    ok, _ = dispatch.kernel_support(torch.zeros(1, 1, 1, 16), "lssar", True)
    return ok


@pytest.mark.skipif(not _kernels_usable(), reason="gravprobe.kernels cannot run here")
@pytest.mark.parametrize("variant", ["softplus", "lssa", "lssar"])
def test_triton_backend_matches_reference(variant):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 15, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    out = attend(q, k, v, variant, backend="triton")
    assert A.active_backend() == "triton"
    ref = attend(q, k, v, variant, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g_out)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_resolve_backend_reports_and_forced_triton_fails_early(no_kernels, caplog):
    with caplog.at_level(logging.INFO, logger="gravprobe.attention.dispatch"):
        assert CausalSelfAttention(16, 2, "lssar").resolve_backend("cpu") == "torch"
    assert any("attention backend: torch on device cpu" in r.getMessage() for r in caplog.records)
    with pytest.raises(BackendUnavailableError):
        CausalSelfAttention(16, 2, "lssar", backend="triton").resolve_backend("cpu")


@pytest.mark.parametrize("variant", ["lssar", "ssmax"])
def test_layer_compiles_without_graph_breaks(variant):
    dispatch._reset()                                    # the first call happens inside the trace
    torch.manual_seed(6)
    layer = CausalSelfAttention(16, 2, variant)
    x = _x(T=7, C=16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
