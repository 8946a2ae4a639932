"""Fused causal two-stage attention kernels (forward and backward) in Triton.

Supported
    variants   ``softplus`` (s = q·k/√d); ``lssa`` (s = log_b(d)·log_b(nᵢ)·(q̂·k̂), the QK-normalisation
               entering as inverse norms qs, ks [B, H, T] that scale the raw q·k, so q̂ is never rounded
               to the input dtype); ``lssar`` (``lssa`` then ReLU(nᵢ·aᵢⱼ − oᵢ)^p re-weighting, two passes
               over keys). Formulas: METHOD.md §2; derivation: ``kernels/README.md``.
    masking    causal (keys j ≤ i, nᵢ = i) and non-causal (all keys, nᵢ = T).
    shapes     q, k, v ``[B, T, H, D]`` with unit stride on the last dim (any other strides); any T ≥ 1;
               head dim D ≤ 128 (padded to a power of two ≥ 16 inside, masked).
    dtypes     float16, bfloat16, float32 inputs; every reduction accumulates in float32.
    backward   deterministic, no atomics: one kernel over query blocks (dQ, d qs, and for ``lssar`` the
               row statistic E), one over key blocks (dK, dV, d ks) that recomputes the weights.

Tested with
    Triton 3.9.0, torch 2.13 — run only in interpreter mode (``TRITON_INTERPRET=1``) on a CPU
    (``tests/test_kernels.py``); compiled ahead of time to cubins for sm_80 and sm_90 without a GPU
    (``python -m gravprobe.kernels.compile_check``, all 81 specialisations). NOT yet run on a GPU: the
    block sizes in ``ops.py`` are untuned guesses, and GPU correctness and speed are unproven until
    ``pytest -m gpu tests/test_kernels.py`` and ``benchmarks/bench_attention.py`` have run on one.

Known limits
    * No float64 (use the PyTorch reference); v must have the head dim of q and k.
    * Offsets along T are 32-bit: T·H·D < 2³¹ per batch element.
    * No dropout, no attention bias, no key-padding mask other than the sequence end.
    * In the interpreter every tile is up-cast to float32 right after loading (bfloat16 tiles load as
      garbage there); on a GPU the matrix products run in the input dtype (fp16/bf16) with float32
      accumulation, and in exact float32 (``input_precision="ieee"``) for float32 inputs.
    * The ``lssar`` weights are (r/M)^p with r = ReLU(nᵢaᵢⱼ − oᵢ) and M the row max of r, so the
      cancellation in nᵢaᵢⱼ − 1 (fp32 relative error ~1e-7 of nᵢaᵢⱼ) is amplified by p in the weights;
      the reference has the same property.
"""

from __future__ import annotations

import triton
import triton.language as tl
from gravprobe.attention.reference import UNIFORM_ROW_RTOL

#: lssar's uniform-row tolerance, as in the reference (a Triton global must be a constexpr).
_UNIFORM_RTOL = tl.constexpr(UNIFORM_ROW_RTOL)

# globals read inside @triton.jit functions must be tl.constexpr instances (the compiler rejects others;
# the interpreter does not check)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log1p_small(y):
    """log(1 + y) for y ∈ [0, 1] to float32 accuracy without libdevice (the interpreter cannot run it):
    a degree-7 series below 0.1 (where rounding 1 + y would lose digits), log2(1 + y) above."""
    series = y * (1.0 + y * (-0.5 + y * (1.0 / 3.0 + y * (-0.25 + y * (0.2 + y * (-1.0 / 6.0 + y / 7.0))))))
    return tl.where(y < 0.1, series, tl.log2(1.0 + y) * LN2)


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(e^−|x|): no overflow for any x, float32-accurate also for x ≪ 0 (where it is e^x)
    return tl.maximum(x, 0.0) + _log1p_small(tl.exp2(-tl.abs(x) * LOG2E))


@triton.jit
def _softplus_sigmoid(x):
    """(softplus(x), sigmoid(x) = softplus′(x)) sharing one exponential."""
    y = tl.exp2(-tl.abs(x) * LOG2E)
    r = 1.0 / (1.0 + y)
    return tl.maximum(x, 0.0) + _log1p_small(y), tl.where(x >= 0.0, r, y * r)


@triton.jit
def _sigmoid(x):
    y = tl.exp2(-tl.abs(x) * LOG2E)
    r = 1.0 / (1.0 + y)
    return tl.where(x >= 0.0, r, y * r)


@triton.jit
def _pow_pos(x, power, POWER_INT: tl.constexpr):
    """x ** power for x ≥ 0 (0 → 0 for power > 0). An integer power 1..63 (POWER_INT > 0, e.g. the default
    15) is evaluated by repeated squaring — a few multiplies, no transcendental; others as exp2(p·log2 x)."""
    if POWER_INT > 0:
        result = tl.zeros_like(x) + 1.0
        base = x
        for bit in tl.static_range(6):
            if (POWER_INT >> bit) & 1:
                result = result * base
            base = base * base
        return result
    else:
        return tl.where(x > 0.0, tl.exp2(power * tl.log2(tl.where(x > 0.0, x, 1.0))), 0.0)


@triton.jit
def _row_terms(offs_m, T, scale, log_coef, offset, offset_until,
               CAUSAL: tl.constexpr, LENGTH_SCALE: tl.constexpr):
    """Per-query-row constants: score scale cᵢ, visible key count nᵢ, re-weighting offset oᵢ."""
    if CAUSAL:
        n_i = (offs_m + 1).to(tl.float32)
    else:
        n_i = tl.zeros_like(offs_m).to(tl.float32) + T
    if LENGTH_SCALE:
        c_i = log_coef * tl.log(n_i)  # log_b(d) · log_b(nᵢ) = [ln d / (ln b)²] · ln nᵢ
    else:
        c_i = tl.zeros_like(n_i) + scale
    o_i = tl.where(n_i <= offset_until, 0.0, offset)  # as the reference: oᵢ = 0 while nᵢ ≤ offset_until
    return c_i, n_i, o_i


@triton.jit
def _valid(offs_m, offs_n, T, CAUSAL: tl.constexpr):
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return ok


@triton.jit
def _load_tile(base, offs_r, stride_r, offs_d, T, HEAD_DIM, UPCAST: tl.constexpr):
    """[len(offs_r), BLOCK_D] tile of rows offs_r; zero outside T × HEAD_DIM."""
    t = tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :],
                mask=(offs_r < T)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)  # interpreter: bf16 tiles load as garbage unless up-cast at once
    return t


@triton.jit
def _fwd_kernel(
    Q, K, V, QS, KS, O, STAT_S, STAT_M, STAT_W,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H, T, HEAD_DIM,
    scale, log_coef, power, offset, offset_until,
    CAUSAL: tl.constexpr, LENGTH_SCALE: tl.constexpr, LSSAR: tl.constexpr, NORM: tl.constexpr,
    POWER_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one block of BLOCK_M query rows of one (batch, head).

    Scores sᵢⱼ = cᵢ·qsᵢ·ksⱼ·(qᵢ·kⱼ), with qs/ks the inverse norms [B, H, T] when NORM (lssa, lssar).
    Writes O [B, T, H, D] and the row statistics [B, H, T] (float32): S (Σⱼ softplus(sᵢⱼ)) and, for
    ``lssar``, M (row max of ReLU(nᵢaᵢⱼ − oᵢ); 0 ⇒ uniform row) and W (Σⱼ (rᵢⱼ/M)^p).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B·T·H·D may exceed 2³¹
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T

    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, T, HEAD_DIM, UPCAST)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    stat_off = pid_bh * T + offs_m
    c_i, n_i, o_i = _row_terms(offs_m, T, scale, log_coef, offset, offset_until, CAUSAL, LENGTH_SCALE)
    if NORM:
        c_i = c_i * tl.load(QS + stat_off, mask=mask_m, other=0.0)

    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        hi = T

    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # pass 1: stage-1 row sums (and, for lssar, the row max of s, which fixes the row max of the weights)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c_i[:, None]
        if NORM:
            s = s * tl.load(KS + pid_bh * T + offs_n, mask=offs_n < T, other=0.0)[None, :]
        ok = _valid(offs_m, offs_n, T, CAUSAL)
        f = tl.where(ok, _softplus(s), 0.0)
        row_sum += tl.sum(f, axis=1)
        if LSSAR:
            row_max = tl.maximum(row_max, tl.max(tl.where(ok, s, float("-inf")), axis=1))
        else:
            v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, UPCAST)
            acc += tl.dot(f.to(v.dtype), v, input_precision=PRECISION)

    safe_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
    tl.store(STAT_S + stat_off, row_sum, mask=mask_m)
    if LSSAR:
        inv = n_i / safe_sum  # nᵢ / Sᵢ, so that nᵢ·aᵢⱼ = softplus(sᵢⱼ) · inv
        r_max = tl.maximum(_softplus(tl.where(mask_m, row_max, 0.0)) * inv - o_i, 0.0)
        uniform = r_max <= _UNIFORM_RTOL * o_i  # within rounding of uniform (reference.UNIFORM_ROW_RTOL)
        r_max = tl.where(uniform, 0.0, r_max)  # stored as 0: the backward kernels test r_max <= 0
        inv_rmax = 1.0 / tl.where(uniform, 1.0, r_max)
        w_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # pass 2: re-weighting, normalised by the row max before the power (overflow safety)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, UPCAST)
            v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c_i[:, None]
            if NORM:
                s = s * tl.load(KS + pid_bh * T + offs_n, mask=offs_n < T, other=0.0)[None, :]
            ok = _valid(offs_m, offs_n, T, CAUSAL)
            x = tl.maximum(_softplus(s) * inv[:, None] - o_i[:, None], 0.0) * inv_rmax[:, None]
            w = _pow_pos(x, power, POWER_INT)
            w = tl.where(uniform[:, None], 1.0, w)  # all weights 0: the limit is the uniform row
            w = tl.where(ok, w, 0.0)
            w_sum += tl.sum(w, axis=1)
            acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
        tl.store(STAT_M + stat_off, r_max, mask=mask_m)
        tl.store(STAT_W + stat_off, w_sum, mask=mask_m)
        out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
    else:
        out = acc / safe_sum[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _lssar_e(s, g, d_i, inv, o_i, inv_rmax, w_scale, power, uniform, POWER_INT: tl.constexpr):
    """eᵢⱼ = ∂L/∂uᵢⱼ for lssar, uᵢⱼ = nᵢaᵢⱼ − oᵢ: p·xᵢⱼ^(p−1)·(gᵢⱼ − Dᵢ)/(Wᵢ·Mᵢ) with xᵢⱼ = ReLU(uᵢⱼ)/Mᵢ,
    and 0 where uᵢⱼ ≤ 0 or the row is uniform. Row vectors broadcast along axis 1.
    Returns (sigmoid(s), e)."""
    f, sig = _softplus_sigmoid(s)
    x = tl.maximum(f * inv[:, None] - o_i[:, None], 0.0) * inv_rmax[:, None]
    e = power * _pow_pos(x, power - 1.0, POWER_INT - 1) * (g - d_i[:, None]) * w_scale[:, None]
    e = tl.where((x > 0.0) & (uniform[:, None] == 0), e, 0.0)
    return sig, e


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, QS, KS, DO, DQ, DQS, STAT_S, STAT_M, STAT_W, STAT_D, STAT_E,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    H, T, HEAD_DIM,
    scale, log_coef, power, offset, offset_until,
    CAUSAL: tl.constexpr, LENGTH_SCALE: tl.constexpr, LSSAR: tl.constexpr, NORM: tl.constexpr,
    POWER_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ (and, with NORM, the gradient of the inverse query norms) for one block of query rows.

    The tile ``ds`` holds ∂L/∂sᵢⱼ divided by a row factor ``rf`` (1/Sᵢ, or nᵢ/Sᵢ for lssar) that is
    applied once at the end. For ``lssar`` a first pass computes Dᵢ and Eᵢ = Σⱼ aᵢⱼ eᵢⱼ and writes both
    into STAT_D / STAT_E for the dK/dV kernel; otherwise STAT_D holds dOᵢ·Oᵢ on entry.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B·T·H·D may exceed 2³¹
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < T

    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, T, HEAD_DIM, UPCAST)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_d, T, HEAD_DIM, UPCAST)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    stat_off = pid_bh * T + offs_m
    row_sum = tl.load(STAT_S + stat_off, mask=mask_m, other=1.0)
    c_i, n_i, o_i = _row_terms(offs_m, T, scale, log_coef, offset, offset_until, CAUSAL, LENGTH_SCALE)
    if NORM:
        qs = tl.load(QS + stat_off, mask=mask_m, other=1.0)
        c_i = c_i * qs
    inv = n_i / row_sum
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        hi = T

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ds_s = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σⱼ dsᵢⱼ·sᵢⱼ, for the gradient of qs
    if LSSAR:
        r_max = tl.load(STAT_M + stat_off, mask=mask_m, other=1.0)
        w_sum = tl.load(STAT_W + stat_off, mask=mask_m, other=1.0)
        uniform = (r_max <= 0.0).to(tl.int32)
        inv_rmax = 1.0 / tl.where(uniform != 0, 1.0, r_max)
        w_scale = inv_rmax / w_sum  # 1 / (Wᵢ·Mᵢ)
        # pass A: Dᵢ = Σⱼ a′ᵢⱼ gᵢⱼ and Eᵢ = Σⱼ aᵢⱼ eᵢⱼ (both need the whole row before any dsᵢⱼ). Dᵢ is
        # recomputed here in float32 rather than taken from dOᵢ·Oᵢ: Oᵢ is stored in the input dtype, and
        # eᵢⱼ ∝ p·(gᵢⱼ − Dᵢ) would amplify its bf16 rounding by p. With hᵢⱼ = p·xᵢⱼ^(p−1) (0 where
        # uᵢⱼ ≤ 0): Eᵢ = [Σⱼ fᵢⱼhᵢⱼgᵢⱼ − Dᵢ Σⱼ fᵢⱼhᵢⱼ] / (Sᵢ·Wᵢ·Mᵢ).
        d_num = tl.zeros([BLOCK_M], dtype=tl.float32)
        fhg = tl.zeros([BLOCK_M], dtype=tl.float32)
        fh = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, UPCAST)
            v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c_i[:, None]
            if NORM:
                s = s * tl.load(KS + pid_bh * T + offs_n, mask=offs_n < T, other=0.0)[None, :]
            g = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ok = _valid(offs_m, offs_n, T, CAUSAL)
            f = _softplus(s)
            x = tl.maximum(f * inv[:, None] - o_i[:, None], 0.0) * inv_rmax[:, None]
            w = tl.where(ok, tl.where(uniform[:, None] != 0, 1.0, _pow_pos(x, power, POWER_INT)), 0.0)
            fh_ij = tl.where(ok & (x > 0.0) & (uniform[:, None] == 0), f * power * _pow_pos(x, power - 1.0, POWER_INT - 1), 0.0)
            d_num += tl.sum(w * g, axis=1)
            fhg += tl.sum(fh_ij * g, axis=1)
            fh += tl.sum(fh_ij, axis=1)
        d_i = d_num / w_sum
        e_sum = (fhg - d_i * fh) * w_scale / row_sum
        tl.store(STAT_D + stat_off, d_i, mask=mask_m)
        tl.store(STAT_E + stat_off, e_sum, mask=mask_m)
        # pass B: ∂L/∂sᵢⱼ = σ(sᵢⱼ)·(nᵢ/Sᵢ)·(eᵢⱼ − Eᵢ)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, UPCAST)
            v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c_i[:, None]
            if NORM:
                ks = tl.load(KS + pid_bh * T + offs_n, mask=offs_n < T, other=0.0)
                s = s * ks[None, :]
            g = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ok = _valid(offs_m, offs_n, T, CAUSAL)
            sig, e = _lssar_e(s, g, d_i, inv, o_i, inv_rmax, w_scale, power, uniform, POWER_INT)
            ds = tl.where(ok, sig * (e - e_sum[:, None]), 0.0)
            if NORM:
                ds_s += tl.sum(ds * s, axis=1)
                ds = ds * ks[None, :]
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        row_factor = inv
    else:
        d_i = tl.load(STAT_D + stat_off, mask=mask_m, other=0.0)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, UPCAST)
            v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * c_i[:, None]
            if NORM:
                ks = tl.load(KS + pid_bh * T + offs_n, mask=offs_n < T, other=0.0)
                s = s * ks[None, :]
            g = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ok = _valid(offs_m, offs_n, T, CAUSAL)
            ds = tl.where(ok, _sigmoid(s) * (g - d_i[:, None]), 0.0)  # ∂L/∂s · Sᵢ
            if NORM:
                ds_s += tl.sum(ds * s, axis=1)
                ds = ds * ks[None, :]
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        row_factor = 1.0 / row_sum
    dq = dq * (c_i * row_factor)[:, None]
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & (offs_d < HEAD_DIM)[None, :])
    if NORM:
        tl.store(DQS + stat_off, ds_s * row_factor / qs, mask=mask_m)


@triton.jit
def _bwd_dkv_kernel(
    Q, K, V, QS, KS, DO, DK, DV, DKS, STAT_S, STAT_M, STAT_W, STAT_D, STAT_E,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    H, T, HEAD_DIM,
    scale, log_coef, power, offset, offset_until,
    CAUSAL: tl.constexpr, LENGTH_SCALE: tl.constexpr, LSSAR: tl.constexpr, NORM: tl.constexpr,
    POWER_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV (and, with NORM, the gradient of the inverse key norms) for one block of BLOCK_N keys,
    looping over the query blocks that see them.

    Works on transposed tiles (keys × queries) so that dV = Σᵢ a′ᵢⱼ dOᵢ and dK = Σᵢ (∂L/∂sᵢⱼ) cᵢ qᵢ are
    plain matrix products; every weight is recomputed from the saved row statistics.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit batch offsets: B·T·H·D may exceed 2³¹
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < T
    mask_nd = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]

    k = _load_tile(K + b * stride_kb + h * stride_kh, offs_n, stride_kt, offs_d, T, HEAD_DIM, UPCAST)
    v = _load_tile(V + b * stride_vb + h * stride_vh, offs_n, stride_vt, offs_d, T, HEAD_DIM, UPCAST)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    if NORM:
        ks = tl.load(KS + pid_bh * T + offs_n, mask=mask_n, other=1.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ds_s = tl.zeros([BLOCK_N], dtype=tl.float32)  # Σᵢ (∂L/∂sᵢⱼ)·sᵢⱼ, for the gradient of ks
    if CAUSAL:
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M  # first query block holding a row i ≥ this block's j
    else:
        lo = 0
    for start_m in range(lo, T, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < T
        q = _load_tile(q_base, offs_m, stride_qt, offs_d, T, HEAD_DIM, UPCAST)
        do = _load_tile(do_base, offs_m, stride_dot, offs_d, T, HEAD_DIM, UPCAST)
        stat_off = pid_bh * T + offs_m
        row_sum = tl.load(STAT_S + stat_off, mask=mask_m, other=1.0)
        d_i = tl.load(STAT_D + stat_off, mask=mask_m, other=0.0)
        c_i, n_i, o_i = _row_terms(offs_m, T, scale, log_coef, offset, offset_until, CAUSAL, LENGTH_SCALE)
        if NORM:
            c_i = c_i * tl.load(QS + stat_off, mask=mask_m, other=0.0)
        # everything below is transposed: [BLOCK_N keys, BLOCK_M queries]
        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * c_i[None, :]
        if NORM:
            s = s * ks[:, None]
        g = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ok = (offs_n[:, None] < T) & (offs_m[None, :] < T)
        if CAUSAL:
            ok = ok & (offs_n[:, None] <= offs_m[None, :])
        if LSSAR:
            r_max = tl.load(STAT_M + stat_off, mask=mask_m, other=1.0)
            w_sum = tl.load(STAT_W + stat_off, mask=mask_m, other=1.0)
            e_i = tl.load(STAT_E + stat_off, mask=mask_m, other=0.0)
            uniform = (r_max <= 0.0).to(tl.int32)
            inv = n_i / row_sum
            inv_rmax = 1.0 / tl.where(uniform != 0, 1.0, r_max)
            f, sig = _softplus_sigmoid(s)
            x = tl.maximum(f * inv[None, :] - o_i[None, :], 0.0) * inv_rmax[None, :]
            w = tl.where(uniform[None, :] != 0, 1.0, _pow_pos(x, power, POWER_INT))
            a = tl.where(ok, w / w_sum[None, :], 0.0)
            e = power * _pow_pos(x, power - 1.0, POWER_INT - 1) * (g - d_i[None, :]) * (inv_rmax / w_sum)[None, :]
            e = tl.where((x > 0.0) & (uniform[None, :] == 0), e, 0.0)
            ds = tl.where(ok, sig * (e - e_i[None, :]) * inv[None, :], 0.0)
        else:
            f, sig = _softplus_sigmoid(s)
            a = tl.where(ok, f / row_sum[None, :], 0.0)
            ds = tl.where(ok, sig * (g - d_i[None, :]) / row_sum[None, :], 0.0)
        dv += tl.dot(a.to(do.dtype), do, input_precision=PRECISION)
        if NORM:
            ds_s += tl.sum(ds * s, axis=1)
        dk += tl.dot((ds * c_i[None, :]).to(q.dtype), q, input_precision=PRECISION)
    if NORM:
        dk = dk * ks[:, None]
        tl.store(DKS + pid_bh * T + offs_n, ds_s / ks, mask=mask_n)
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=mask_nd)
