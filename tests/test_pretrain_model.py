"""The GPT of METHOD §3: shapes, causality (both modalities), hidden states, positions, presets."""
from __future__ import annotations

import pytest
import torch
from gravprobe.pretrain.model import GPT, GPTConfig, SequenceTooLongError

V = 50  # bins; vocabulary V + 3


def _model(variant="softmax", **kw) -> GPT:
    torch.manual_seed(0)
    base = {"n_layers": 2, "n_heads": 2, "d_model": 32, "block_size": 32, "orbit_vocab": V + 3,
            "text_vocab": 257, "attention": {"name": variant, "params": {}, "backend": "torch"}}
    return GPT(GPTConfig(**{**base, **kw})).eval()


def _orbit_tokens(B=2, T=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T, 2), generator=g)
    x[:, 0] = V          # dt marker
    return x


@pytest.mark.parametrize("variant", ["softmax", "lssar"])
def test_shapes_both_modalities(variant):
    m = _model(variant)
    x = _orbit_tokens()
    (lx, ly), loss = m.forward_orbits(x[:, :-1], x[:, 1:])
    assert lx.shape == ly.shape == (2, 19, V + 3)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(V + 3.0)).item()) < 0.5   # near-uniform at init
    t = torch.randint(0, 257, (3, 17))
    logits, tl = m.forward_text(t[:, :-1], t[:, 1:])
    assert logits.shape == (3, 16, 257) and torch.isfinite(tl)
    hs = m.hidden_states(x)
    assert len(hs) == m.n_layers + 1 == 3
    assert all(h.shape == (2, 20, m.d_model) for h in hs)
    enc = m.encode(x)
    assert enc.shape == (2, 20, 32)
    torch.testing.assert_close(enc, m.ln_f(hs[-1]))
    assert m.text_emb.weight.data_ptr() == m.text_emb.weight.data_ptr()  # tied head reads the embedding


@pytest.mark.parametrize("variant", ["softmax", "lssar", "ssmax"])
def test_causality_orbits_and_text(variant):
    m = _model(variant)
    x = _orbit_tokens(T=24)
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, y[:, 12:].shape)
    (a, _), _ = m.forward_orbits(x)
    (b, _), _ = m.forward_orbits(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-4)   # the change is visible downstream
    t = torch.randint(0, 257, (2, 24))
    u = t.clone()
    u[:, 12:] = (u[:, 12:] + 1) % 257
    la, _ = m.forward_text(t)
    lb, _ = m.forward_text(u)
    assert torch.allclose(la[:, :12], lb[:, :12], atol=1e-6)
    assert not torch.allclose(la[:, 12:], lb[:, 12:], atol=1e-4)


def test_padding_targets_are_ignored():
    m = _model()
    x = _orbit_tokens(T=20)
    tgt = x[:, 1:].clone()
    _, full = m.forward_orbits(x[:, :-1], tgt)
    tgt2 = tgt.clone()
    tgt2[:, 10:] = V + 2                                # padding
    _, part = m.forward_orbits(x[:, :-1], tgt2)
    (lx, ly), _ = m.forward_orbits(x[:, :-1])
    ce = torch.nn.functional.cross_entropy
    want = 0.5 * (ce(lx[:, :10].flatten(0, 1), tgt[:, :10, 0].flatten())
                  + ce(ly[:, :10].flatten(0, 1), tgt[:, :10, 1].flatten()))
    torch.testing.assert_close(part, want)
    assert not torch.isclose(part, full)


def test_continuous_mode_markers_and_noise():
    m = _model(orbit_mode="continuous", context_noise=0.1)
    pos = torch.randn(2, 16, 2) * 5
    pos[:, 0] = float("nan")                          # dt marker
    pred, loss = m.forward_orbits(pos[:, :-1], pos[:, 1:])
    assert pred.shape == (2, 15, 2) and torch.isfinite(loss)
    assert len(m.hidden_states(pos)) == 3
    m.eval()
    a = m.encode(pos)
    b = m.encode(pos)
    torch.testing.assert_close(a, b)                  # no noise in eval
    m.train()
    torch.manual_seed(1)
    c = m.encode(pos)
    assert not torch.allclose(a, c)                   # noise in training


def test_learned_positions_limit_and_rope_length_freedom():
    learned = _model(position="learned", block_size=16)
    with pytest.raises(SequenceTooLongError, match="learned-position"):
        learned.encode(_orbit_tokens(T=17))
    assert learned.encode(_orbit_tokens(T=16)).shape == (2, 16, 32)
    rope = _model(block_size=16)
    assert rope.encode(_orbit_tokens(T=64)).shape == (2, 64, 32)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="position"):
        GPTConfig(position="alibi", orbit_vocab=10)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4, orbit_vocab=10)
    with pytest.raises(ValueError, match="unknown attention variant"):
        GPT(GPTConfig(orbit_vocab=10, attention={"name": "nope"}))


def test_no_attention_math_in_model():
    import inspect

    import gravprobe.pretrain.model as mod

    src = inspect.getsource(mod)
    for banned in ("softmax(", "softplus(", "scaled_dot_product_attention", "masked_fill"):
        assert banned not in src


@pytest.mark.parametrize("preset,lo,hi", [("tiny", 5e4, 5e5), ("small", 5e5, 3e6), ("vafa109m", 8.0e7, 9.0e7)])
def test_preset_trunk_sizes(preset, lo, hi):
    """Non-embedding parameter counts of the model presets (the meta device allocates nothing)."""
    from gravprobe.pretrain.train import model_config
    from hydra import compose, initialize_config_module

    with initialize_config_module("gravprobe.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={preset}", "attention=softmax"])
    with torch.device("meta"):
        m = GPT(model_config(cfg, orbit_vocab=7003, text_vocab=0))
    assert lo < m.num_params(non_embedding=True) < hi
    if preset == "vafa109m":
        assert 1.0e8 < m.num_params() < 1.15e8      # ~107M with V = 7000 (METHOD §3: ~109M)


def test_silu_activation_and_last_position_targets():
    import pytest
    import torch
    from gravprobe.pretrain.model import GPT, GPTConfig

    with pytest.raises(ValueError, match="model.activation"):
        GPTConfig(orbit_vocab=10, activation="tanh")
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=1, n_heads=1, d_model=8, orbit_vocab=4, orbit_mode="continuous", activation="silu"))
    x = torch.randn(3, 4, 8)
    assert torch.allclose(m.blocks[0].mlp(x), m.blocks[0].mlp.proj(torch.nn.functional.silu(m.blocks[0].mlp.fc(x))))
    # continuous: NaN marks unscored targets; "last" keeps only each sequence's last finite target
    orb = torch.randn(2, 6, 2)
    orb[0, 0] = float("nan")        # a dt marker
    orb[1, 4:] = float("nan")       # padding after step 3
    tgt = m.orbit_targets(orb, "last")
    finite = torch.isfinite(tgt).all(-1)
    assert finite.sum(1).tolist() == [1, 1]
    assert finite[0, 4] and finite[1, 2]
    assert torch.equal(tgt[0, 4], orb[0, 5]) and torch.equal(tgt[1, 2], orb[1, 3])
    with pytest.raises(ValueError, match="train.orbit_loss"):
        m.orbit_targets(orb, "first")
    # discrete: padding id marks unscored targets
    d = GPT(GPTConfig(n_layers=1, n_heads=1, d_model=8, orbit_vocab=13))
    tok = torch.randint(0, 10, (2, 5, 2))
    tok[1, 3:] = d.cfg.orbit_pad
    t = d.orbit_targets(tok, "last")
    keep = t[..., 0] != d.cfg.orbit_pad
    assert keep.nonzero().tolist() == [[0, 3], [1, 1]]


def test_step_schedule_drops_at_half():
    from gravprobe.pretrain.train import lr_factor

    assert [lr_factor(s, 0, 10, 0.1, "step") for s in (0, 4, 5, 9)] == [1.0, 1.0, 0.1, 0.1]
    assert lr_factor(0, 2, 10, 0.1, "step") == 0.5
    import pytest

    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor(0, 0, 10, 0.1, "linear")
