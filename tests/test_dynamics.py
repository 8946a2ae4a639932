"""gravprobe.pretrain.dynamics: kinematic baselines against closed forms, the residual distribution by hand,
oracle and uniform models, determinism, layouts with and without star tokens (issue 14 §1)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gravprobe.orbits import DatasetSpec, OrbitTokenizer, generate_arrays
from gravprobe.pretrain.dynamics import (
    BASELINES,
    ResidualDistribution,
    evaluate_dynamics,
    kinematic_predictions,
    previous_indices,
)
from gravprobe.pretrain.model import GPT, GPTConfig
from torch import nn

V, R = 200, 50.0          # bins, coord_range (AU)
TOK = OrbitTokenizer(V, R)


def _gpt(mode="discrete", position="rope", block_size=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=1, n_heads=2, d_model=16, block_size=block_size, position=position,
                         orbit_vocab=V + 3, orbit_mode=mode,
                         attention={"name": "softmax", "params": {}, "backend": "torch"}))


@pytest.fixture(scope="module")
def data():
    spec = DatasetSpec(n_systems=48, seq_len=41, n_bins=V, coord_range=R, planets=(1, 3), shard_size=64)
    with pytest.MonkeyPatch.context() as mp:             # same bytes as numba, without its compile time
        mp.setenv("GRAVPROBE_ORBITS_ENGINE", "numpy")
        return generate_arrays(spec, 3)


def _split(n):
    return np.arange(0, n - 12), np.arange(n - 12, n)


# ---------------------------------------------------------------------------- circular orbits by hand
def _circular(radii, phis, T, star=True, theta0=0.3):
    """One sequence: planets j on circles (radius r_j AU, angle step phi_j per time step) about a star at
    the origin, laid out marker, planet 1..K[, star] per time step. -> tokens, positions, bodies [1, T, ...]"""
    K = len(radii)
    per = K + (1 if star else 0)
    pos = np.zeros((1, T, 2))
    bodies = np.full((1, T), -1, np.int8)
    for t in range(1, T):
        n, j = divmod(t - 1, per)
        if (T - 1) // per <= n:
            break
        if j < K:
            ang = theta0 + j + n * phis[j]
            pos[0, t] = radii[j] * np.cos(ang), radii[j] * np.sin(ang)
            bodies[0, t] = j + 1
        else:
            bodies[0, t] = 0                                     # star at rest at the origin
    tokens = TOK.encode(pos).astype(np.int64)
    tokens[bodies < 0] = TOK.pad_id
    tokens[:, 0] = V
    return tokens, pos.astype(np.float32), bodies


def _miss(r, phi, m):
    """m-th order rule on z_n = r e^{i n phi}: |z_n (1 - e^{-i phi})^m| (written out per order)."""
    return {1: 2 * r * math.sin(phi / 2), 2: 4 * r * math.sin(phi / 2) ** 2, 3: 8 * r * math.sin(phi / 2) ** 3}[m]


@pytest.mark.parametrize("star", [True, False])
def test_previous_indices_follow_bodies(star):
    _, _, bodies = _circular([1.0, 2.0], [0.1, 0.2], 16, star=star)
    prev = previous_indices(bodies)[0]
    per = 3 if star else 2
    for t in range(16):
        if bodies[0, t] < 0:
            assert (prev[t] == -1).all()
            continue
        want = [t - m * per if t - m * per >= 1 else -1 for m in (1, 2, 3)]
        assert prev[t].tolist() == want, t


@pytest.mark.parametrize("star", [True, False])
def test_circular_orbit_errors_in_closed_form(star):
    radii, phis = [1.5, 4.0], [0.37, 0.11]
    _, pos, bodies = _circular(radii, phis, 40, star=star)
    prev = previous_indices(bodies)
    preds = kinematic_predictions(pos.astype(np.float64), prev)
    scored = (bodies >= 0) & (prev[..., 2] >= 1)
    assert scored.sum() > 10
    for name, order in zip(BASELINES, (1, 2, 3)):
        err = np.linalg.norm(preds[name] - pos, axis=-1)
        for j, (r, phi) in enumerate(zip(radii, phis), start=1):
            sel = scored & (bodies == j)
            np.testing.assert_allclose(err[sel], _miss(r, phi, order), rtol=1e-5, atol=1e-6)
        if star:
            assert np.all(err[scored & (bodies == 0)] < 1e-12)     # a star at rest is predicted exactly


def test_continuous_evaluation_matches_closed_forms():
    """Through evaluate_dynamics: MSE per coordinate (AU²), mean error, and the roll-outs of a planet alone
    (one token = one time step): copy-previous misses by 2 r sin(s phi/2) after s steps, the velocity and
    acceleration rules by the distance from the circle to their line / parabola through the last points."""
    r, phi, T = 3.0, 0.21, 30
    tok, pos, bodies = _circular([r], [phi], T, star=False)
    tokens, positions, bod = (np.repeat(a, 4, axis=0) for a in (tok, pos, bodies))
    k = 6
    res = evaluate_dynamics(_gpt("continuous"), tokens, positions, bod, n_bins=V, coord_range=R,
                            train_ids=[0, 1], val_ids=[2, 3], context=T - 1, rollout_steps=k)
    assert res["unit"] == "AU^2/coordinate (MSE)" and res["n_targets"] == 2 * (T - 1 - 3)
    assert res["rollout"] == {"context": T - k, "steps": k, "n_systems": 2, "n_targets": {str(s): 2 for s in
                                                                                        range(1, k + 1)}}
    z = lambda n: r * np.exp(1j * (0.3 + n * phi))     # planet at time step n (token n + 1)
    c = T - k                                            # first generated token = time step c - 1
    for name, order in zip(BASELINES, (1, 2, 3)):
        b = res["baselines"][name]
        e = _miss(r, phi, order)
        assert b["next_position_error_au"] == pytest.approx(e, rel=1e-4)
        assert b["loss"] == pytest.approx(e ** 2 / 2, rel=1e-4)
        for s in range(1, k + 1):
            n1 = c - 2                                    # last given time step
            d1, d2 = z(n1) - z(n1 - 1), z(n1) - 2 * z(n1 - 1) + z(n1 - 2)
            guess = {1: z(n1), 2: z(n1) + s * d1, 3: z(n1) + s * d1 + s * (s + 1) / 2 * d2}[order]
            assert b["rollout_error_au"][str(s)] == pytest.approx(abs(z(n1 + s) - guess), rel=1e-4, abs=1e-6)
    assert res["baselines"]["copy_previous"]["rollout_error_au"]["3"] == pytest.approx(
        2 * r * math.sin(3 * phi / 2), rel=1e-4)
    assert res["best_baseline"] == "constant_acceleration"


# ----------------------------------------------------------------------------- residual distribution
def test_residual_distribution_by_hand():
    Vs = 5
    d = ResidualDistribution.fit(np.array([0, 0, 1, -1, 0]), Vs, smoothing=0.5)
    assert d.support == 1
    tail = 1 / 7                                          # (n_out + 1) / (n + 2), spread over 6 offsets
    q = np.full(2 * Vs - 1, tail / 6)
    q[3:6] = (1 - tail) * np.array([1.5, 3.5, 1.5]) / 6.5
    np.testing.assert_allclose(d.q, q, rtol=1e-12)
    assert d.q.sum() == pytest.approx(1.0, abs=1e-12)
    # p(true = 2 | pred = 2): offsets -2..2 are reachable, q(0) / (1 - tail + 2 tail / 6)
    want = math.log((1 - tail) * 3.5 / 6.5) - math.log((1 - tail) + 2 * tail / 6)
    assert d.log_prob(np.array([2]), np.array([2]))[0] == pytest.approx(want, rel=1e-12)
    # p(true = 4 | pred = 0): offset 4 (tail); reachable offsets 0..4
    want = math.log(tail / 6) - math.log((1 - tail) * 5.0 / 6.5 + 3 * tail / 6)
    assert d.log_prob(np.array([4]), np.array([0]))[0] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("support", [None, 3, 0])
def test_residual_distribution_normalised_for_every_prediction(support):
    rng = np.random.default_rng(0)
    d = ResidualDistribution.fit(rng.integers(-6, 7, size=300), 30, support=support)
    true = np.arange(30)
    for pred in (-4, 0, 7, 29, 40):                       # out-of-grid predictions are clipped
        p = np.exp(d.log_prob(true, np.full(30, pred)))
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(p > 0)


def test_residual_distribution_rejects_bad_input():
    with pytest.raises(ValueError, match="clip predictions"):
        ResidualDistribution.fit(np.array([0, 12]), 10)
    with pytest.raises(ValueError, match="smoothing"):
        ResidualDistribution.fit(np.array([0]), 10, smoothing=0)


def test_discrete_baseline_loss_matches_reference_loop(data):
    """The baseline loss equals a plain-Python transcription: fit counts on training targets, score
    -log q(true - pred) / Σ_k q(k - pred) on validation targets, average over targets and x, y."""
    tr, va = _split(len(data["tokens"]))
    tr, va = tr[:16], va[:5]                              # the loop below is slow Python
    res = evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], n_bins=V, coord_range=R,
                            train_ids=tr, val_ids=va, context=40, rollout_steps=0)

    def targets(ids):
        out = []
        for i in ids:
            tok, bod = data["tokens"][i, :41].astype(int), data["bodies"][i, :41]
            for t in range(1, 41):
                hist = [u for u in range(1, t) if bod[u] == bod[t]] if bod[t] >= 0 else []
                if len(hist) >= 3:
                    x1, x2, x3 = (tok[hist[-m]] for m in (1, 2, 3))
                    out.append((tok[t], {"copy_previous": x1, "constant_velocity": 2 * x1 - x2,
                                         "constant_acceleration": 3 * x1 - 3 * x2 + x3}))
        return out

    fit, val = targets(tr), targets(va)
    assert res["n_targets"] == len(val)
    for name in BASELINES:
        total = 0.0
        for c in range(2):
            res_c = [int(true[c] - min(max(p[name][c], 0), V - 1)) for true, p in fit]
            S = max(abs(x) for x in res_c)
            n_out, a = 0, 0.5
            tail = (n_out + 1) / (len(res_c) + 2)

            def q(o, res_c=res_c, S=S, tail=tail, a=a):
                if abs(o) <= S:
                    return (1 - tail) * (res_c.count(o) + a) / (len(res_c) + a * (2 * S + 1))
                return tail / (2 * (V - 1 - S))

            for true, p in val:
                pr = min(max(p[name][c], 0), V - 1)
                z = sum(q(k - pr) for k in range(V))
                total += -math.log(q(true[c] - pr) / z)
        assert res["baselines"][name]["loss"] == pytest.approx(total / (2 * len(val)), rel=1e-9)


# --------------------------------------------------------------------------------- model comparisons
class _Oracle(nn.Module):
    """Knows the validation sequences: predicts the true next token (logit 40 on the true bins, i.e.
    p ≈ 1) or the true next position. Its 'hidden state' is (row, position)."""

    def __init__(self, tokens, positions, mode):
        super().__init__()
        self.cfg = GPTConfig(n_layers=1, n_heads=1, d_model=2, orbit_vocab=V + 3, orbit_mode=mode)
        self.tokens = torch.as_tensor(np.asarray(tokens, np.int64))
        self.positions = torch.as_tensor(np.asarray(positions, np.float32))

    def encode(self, x):
        B, T, _ = x.shape
        if self.cfg.orbit_mode == "discrete":
            match = (self.tokens[None, :, :T] == x[:, None]).all(-1).all(-1)            # [B, N]
        else:
            ref = self.positions[None, :, :T]
            same = (ref == x[:, None]) | (torch.isnan(x[:, None]))
            match = same.all(-1).all(-1)
        row = match.float().argmax(-1)
        assert bool(match.any(-1).all()), "oracle fed a prefix it does not know"
        return torch.stack([row[:, None].expand(B, T).float(), torch.arange(T).float().expand(B, T)], -1)

    def orbit_outputs(self, h):
        row, t = h[..., 0].long(), h[..., 1].long() + 1
        if self.cfg.orbit_mode == "continuous":
            return self.positions[row, t]
        nxt = self.tokens[row, t]
        return tuple(40.0 * torch.nn.functional.one_hot(nxt[..., c], V + 3).float() for c in range(2))


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_oracle_beats_every_baseline_and_uniform_loses(data, mode):
    tr, va = _split(len(data["tokens"]))
    kw = {"n_bins": V, "coord_range": R, "train_ids": tr, "val_ids": va, "context": 40, "rollout_steps": 5}
    pos = np.where((data["tokens"] < V).all(-1, keepdims=True), data["positions"], np.nan)
    oracle = evaluate_dynamics(_Oracle(data["tokens"], pos, mode), data["tokens"], data["positions"],
                               data["bodies"], **kw)
    m = oracle["model"]
    assert oracle["rollout"]["n_systems"] > 0 and len(m["rollout_error_au"]) == 5
    assert oracle["beats_best_baseline"] and "beats the best" in oracle["verdict"]
    assert all(m["loss"] < b["loss"] for b in oracle["baselines"].values())
    half_diag = TOK.bin_width / math.sqrt(2)
    if mode == "discrete":
        assert m["loss"] < 1e-10                         # -log(1 - 202 e^-40) per coordinate
        assert m["next_position_error_au"] <= half_diag    # only quantisation remains
        assert all(v <= half_diag for v in m["rollout_error_au"].values())
    else:
        assert m["loss"] == pytest.approx(0.0, abs=1e-10)
        assert m["next_position_error_au"] == pytest.approx(0.0, abs=1e-6)
        assert all(v == pytest.approx(0.0, abs=1e-6) for v in m["rollout_error_au"].values())
    assert m["next_position_r2"] > max(b["next_position_r2"] for b in oracle["baselines"].values()) - 1e-9

    if mode == "discrete":
        uniform = _gpt()
        with torch.no_grad():
            uniform.orbit_head_x.weight.zero_()
            uniform.orbit_head_y.weight.zero_()
        res = evaluate_dynamics(uniform, data["tokens"], data["positions"], data["bodies"], **kw)
        assert res["model"]["loss"] == pytest.approx(math.log(V + 3), rel=1e-6)
    else:
        zero = _gpt("continuous")                        # predicts the origin for every token
        with torch.no_grad():
            zero.orbit_out.weight.zero_()
        res = evaluate_dynamics(zero, data["tokens"], data["positions"], data["bodies"], **kw)
    assert not res["beats_best_baseline"] and "does not beat" in res["verdict"]
    assert all(res["model"]["loss"] > b["loss"] for b in res["baselines"].values())
    # the same targets and the same baseline numbers whatever the model
    assert res["n_targets"] == oracle["n_targets"] and res["baselines"] == oracle["baselines"]


@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_deterministic_and_json(data, mode):
    tr, va = _split(len(data["tokens"]))
    model = _gpt(mode).train()
    run = lambda: evaluate_dynamics(model, data["tokens"], data["positions"], data["bodies"], n_bins=V,
                                    coord_range=R, train_ids=tr, val_ids=va, context=40, rollout_steps=4)
    a, b = run(), run()
    assert json.dumps(a, allow_nan=False) == json.dumps(b, allow_nan=False)
    assert model.training                                 # the training flag is restored
    assert set(a["model"]) == {"loss", "next_position_error_au", "next_position_r2", "rollout_error_au",
                               "rollout_mean_error_au"}
    assert list(a["model"]["rollout_error_au"]) == ["1", "2", "3", "4"]
    assert a["unit"] == ("nats/coordinate" if mode == "discrete" else "AU^2/coordinate (MSE)")


def _drop_star(arrays):
    """The same systems laid out without star tokens (planets only, padding moved to the end)."""
    tok, pos, bod = arrays["tokens"], arrays["positions"], arrays["bodies"]
    out_t, out_p, out_b = np.full_like(tok, TOK.pad_id), np.zeros_like(pos), np.full_like(bod, -1)
    for i in range(len(tok)):
        keep = np.nonzero(bod[i] != 0)[0]                # marker + planets (and trailing padding)
        keep = keep[(bod[i, keep] > 0) | (keep == 0)]
        out_t[i, :len(keep)], out_p[i, :len(keep)], out_b[i, :len(keep)] = tok[i, keep], pos[i, keep], bod[i, keep]
    return out_t, out_p, out_b


def test_layout_without_star_tokens(data):
    tokens, positions, bodies = _drop_star(data)
    assert not (bodies == 0).any()
    prev = previous_indices(bodies)
    K = data["n_bodies"].astype(int) - 1
    for i in range(len(bodies)):                         # planet j's previous token is K tokens back
        t = np.nonzero(bodies[i] > 0)[0]
        t = t[t > K[i]]
        np.testing.assert_array_equal(prev[i, t, 0], t - K[i])
    tr, va = _split(len(tokens))
    res = evaluate_dynamics(_gpt(), tokens, positions, bodies, n_bins=V, coord_range=R, train_ids=tr,
                            val_ids=va, context=40, rollout_steps=4)
    b = bodies[va, :41]
    assert res["n_targets"] == int(((b > 0) & (prev[va, :41, 2] >= 1)).sum())
    with_star = evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], n_bins=V,
                                  coord_range=R, train_ids=tr, val_ids=va, context=40, rollout_steps=4)
    assert with_star["n_targets"] != res["n_targets"]


def test_learned_positions_cut_to_block_size(data):
    tr, va = _split(len(data["tokens"]))
    res = evaluate_dynamics(_gpt(position="learned", block_size=24), data["tokens"], data["positions"],
                            data["bodies"], n_bins=V, coord_range=R, train_ids=tr, val_ids=va, context=40,
                            rollout_steps=4)
    assert res["context"] == 24 and res["rollout"]["context"] == 21


def test_positions_optional_for_discrete_models(data):
    tr, va = _split(len(data["tokens"]))
    res = evaluate_dynamics(_gpt(), data["tokens"], None, data["bodies"], n_bins=V, coord_range=R,
                            train_ids=tr, val_ids=va, context=40, rollout_steps=2)
    assert res["truth"] == "bin centres"
    with pytest.raises(ValueError, match="positions"):
        evaluate_dynamics(_gpt("continuous"), data["tokens"], None, data["bodies"], n_bins=V, coord_range=R,
                          train_ids=tr, val_ids=va, context=40)


def test_clear_errors(data):
    tr, va = _split(len(data["tokens"]))
    kw = {"coord_range": R, "train_ids": tr, "val_ids": va, "context": 40}
    with pytest.raises(ValueError, match="n_bins"):
        evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], n_bins=V + 1, **kw)
    with pytest.raises(ValueError, match="rollout_steps"):
        evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], n_bins=V,
                          rollout_steps=-1, **kw)
    with pytest.raises(ValueError, match="bodies"):
        evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"][:, :-1], n_bins=V, **kw)
    with pytest.raises(ValueError, match="bodies"):
        evaluate_dynamics(_gpt(), data["tokens"], data["positions"], None, n_bins=V, **kw)


def test_head_chunks_do_not_change_the_numbers(data, monkeypatch):
    import gravprobe.pretrain.dynamics as dyn

    tr, va = _split(len(data["tokens"]))
    kw = {"n_bins": V, "coord_range": R, "train_ids": tr, "val_ids": va, "context": 40, "rollout_steps": 2}
    whole = evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], **kw)
    monkeypatch.setattr(dyn, "_HEAD_ROWS", 7)
    chunked = evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], **kw)
    assert chunked["model"]["loss"] == pytest.approx(whole["model"]["loss"], rel=1e-6)
    assert chunked["model"]["next_position_error_au"] == whole["model"]["next_position_error_au"]


def test_short_context_cuts_the_rollout_and_no_targets_is_a_verdict(data):
    tr, va = _split(len(data["tokens"]))
    kw = {"n_bins": V, "coord_range": R, "train_ids": tr, "val_ids": va}
    res = evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], context=12,
                            rollout_steps=20, **kw)
    assert res["rollout"]["steps"] == 9 and res["rollout"]["context"] == 4
    # 5 tokens: marker + 4 body tokens never hold three earlier steps of a body with its star
    two = data["n_bodies"][va] >= 2
    res = evaluate_dynamics(_gpt(), data["tokens"], data["positions"], data["bodies"], context=4,
                            **{**kw, "val_ids": va[two]})
    assert res["n_targets"] == 0 and res["model"] is None and not res["beats_best_baseline"]
    assert "cannot be judged" in res["verdict"]
    json.dumps(res, allow_nan=False)
