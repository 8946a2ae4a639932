"""Speed and memory of the attention variants: fused Triton kernels vs PyTorch SDPA vs the eager reference.

Run the correctness tests first (``pytest tests/test_kernels.py``, and ``-m gpu`` on a GPU): the numbers
mean nothing for a kernel that is wrong. On a GPU the script also re-checks the kernels against the
reference at one small shape before it times anything, and refuses to report if they disagree.

GPU (default when CUDA is present)::

    python benchmarks/bench_attention.py                     # T = 1K..16K, D = 64, bf16, 32K tokens/batch
    python benchmarks/bench_attention.py --seq-lens 1024 4096 --variants lssar --json out.json

  For each T: B = tokens // T, H = --heads; forward and forward+backward time (median of CUDA-event
  timings), effective TFLOP/s and peak memory of ``sdpa`` (``F.scaled_dot_product_attention``, causal,
  flash backend), ``kernel:<variant>`` (``gravprobe.kernels.fused_attention``) and ``eager:<variant>``
  (``gravprobe.attention.reference_attention``, which materialises T×T and runs out of memory first);
  ratios vs SDPA. FLOPs use the FlashAttention convention for causal attention, whatever the variant:
  forward 2·B·H·T²·D (two T×T×D products, half of them masked), backward 2.5 × forward — so the TFLOP/s
  of different variants compare their speed at the same useful work.

Implementations (``--impls``, default all that apply): ``sdpa``; ``kernel`` (Triton, CUDA only);
``flex`` (``gravprobe.attention.flex.flex_attend``, compiled; forward+backward on CUDA only); ``torch``
(``gravprobe.attention.eager.eager_attention``, the torch backend); ``eager`` (the reference).

Dry run (``--dry-run``): the GPU code path (checks, every implementation, memory columns, targets) on the
CPU at tiny shapes — Triton in interpreter mode (``TRITON_INTERPRET=1``), FlexAttention unfused and
forward only — so CI keeps ``benchmarks/gpu_check.sh`` working without a GPU. Its numbers mean nothing.

Targets (issue 13, printed after the table on the GPU path): ``lssa`` forward+backward ≤ 1.2× SDPA,
``lssar`` ≤ 1.5×, each Triton kernel at least as fast as flex for its variant (else ``auto`` should prefer
flex: the recommended order is printed), peak memory linear in T.

CPU (``--device cpu``, the default without CUDA)::

    python benchmarks/bench_attention.py --device cpu

  The reference variants vs SDPA at the model's training shapes (B=8, T=256, H=4, D=32 and
  B=2, T=1000, H=4, D=32, float32), forward and forward+backward process CPU time and wall time (each
  the minimum over the repeats: robust to other processes on a shared machine). The Triton kernels are not
  timed on the CPU (the interpreter is a debugging tool, orders of magnitude slower).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from gravprobe.attention import reference_attention
from gravprobe.attention.eager import eager_attention

DEFAULT_VARIANTS = ("softplus", "lssa", "lssar")
CPU_SHAPES = ((8, 256, 4, 32), (2, 1000, 4, 32))


def _sdpa(q, k, v):
    # SDPA takes [B, H, T, D]; the project's layout is [B, T, H, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def _call(fn, q, k, v, *, variant):
    return fn(q, k, v, variant)


IMPLS = ("sdpa", "kernel", "flex", "torch", "eager")


def _implementations(variants, device, kinds=("sdpa", "kernel", "eager"), kernels=None):
    """``{name: fn(q, k, v)}`` for the implementation kinds asked for (``kernel`` needs ``kernels``: CUDA or
    the dry run's interpreter)."""
    impls = {"sdpa": _sdpa} if "sdpa" in kinds else {}
    if "kernel" in kinds and (device == "cuda" or kernels):
        from gravprobe.kernels import fused_attention

        for variant in variants:
            impls[f"kernel:{variant}"] = functools.partial(_call, fused_attention, variant=variant)
    if "flex" in kinds:
        from gravprobe.attention.flex import FLEX_VARIANTS, flex_attend

        for variant in variants:
            if variant in FLEX_VARIANTS:
                impls[f"flex:{variant}"] = functools.partial(_call, flex_attend, variant=variant)
    if "torch" in kinds:
        for variant in variants:
            impls[f"torch:{variant}"] = functools.partial(_call, eager_attention, variant=variant)
    if "eager" in kinds:
        for variant in variants:
            impls[f"eager:{variant}"] = functools.partial(_call, reference_attention, variant=variant)
    return impls


def _flops(B, T, H, D, backward):
    fwd = 4.0 * B * H * T * T * D / 2.0
    return fwd * (3.5 if backward else 1.0)


def _time_cuda(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)  # a dedicated GPU: the median is robust and representative


def _time_cpu(fn, warmup, repeats):
    """(wall seconds, process CPU seconds), each the minimum over the repeats.

    On a shared CPU other processes only add time, so minima estimate the cost itself; the process CPU
    time (all threads) does not grow while the process waits for a core, so it is the fairer measure on
    a loaded machine (wall-clock medians moved 2× between runs on a loaded 2-core machine)."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def _measure(impl, B, T, H, D, dtype, device, backward, warmup, repeats):
    """(seconds, peak bytes above the inputs or None) of one forward (+ backward) call; None on OOM or when
    the implementation cannot run the call (e.g. flex backward on the CPU). On the CPU, seconds is the pair
    (wall, process CPU time)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    if backward:
        for t in (q, k, v):
            t.requires_grad_()

    def step():
        out = impl(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)

    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            seconds = _time_cuda(step, warmup, repeats)
        else:
            peak = None
            seconds = _time_cpu(step, warmup, repeats)
    except torch.OutOfMemoryError:
        if device == "cuda":
            torch.cuda.empty_cache()
        return None, None
    except Exception as exc:  # noqa: BLE001 - report the implementation as unable, keep going
        if device == "cuda" or "backward" not in str(exc).lower():
            print(f"  {getattr(impl, 'keywords', {}).get('variant', '')} failed: {type(exc).__name__}: "
                  f"{str(exc)[:300]}", file=sys.stderr)
        return None, None
    return seconds, peak


def _check_kernels(variants, dtype, device="cuda", shape=(2, 256, 4, 64), impls=None):
    """Each implementation vs the reference at one small shape; raises if any disagrees (tests should have
    run). ``impls``: the ``{name: fn}`` to check (default: the Triton kernels)."""
    if impls is None:
        from gravprobe.kernels import fused_attention

        impls = {f"kernel:{v}": functools.partial(_call, fused_attention, variant=v) for v in variants}
    gen = torch.Generator(device="cpu").manual_seed(1)
    q, k, v = (torch.randn(*shape, generator=gen).to(device) for _ in range(3))
    for name, fn in impls.items():
        if name == "sdpa":
            continue
        variant = name.split(":", 1)[1]
        ref = reference_attention(q, k, v, variant)
        with torch.no_grad():
            out = fn(q.to(dtype), k.to(dtype), v.to(dtype)).float()
        err = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        if not err < 3e-2:
            raise SystemExit(f"{name} disagrees with the reference (relative RMS {err:.3g}); "
                             f"run pytest -m gpu tests/test_kernels.py tests/test_attention_flex.py")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import triton

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU timings
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def _fmt(x, spec="{:.2f}"):
    """``n/a``: out of memory, not supported (flex backward on the CPU) or not measured (CPU memory)."""
    return "n/a" if x is None else spec.format(x)


def run_gpu(args) -> list[dict]:
    """The GPU path; with ``args.dry_run`` the same code on the CPU (interpreter kernels, eager flex)."""
    dtype = getattr(torch, args.dtype)
    device = "cpu" if args.dry_run else "cuda"
    impls = _implementations(args.variants, device, tuple(args.impls), kernels=args.dry_run)
    shape = (1, 32, 2, 16) if args.dry_run else (2, 256, 4, 64)
    _check_kernels(args.variants, dtype, device, shape, {n: f for n, f in impls.items() if "eager" not in n})
    rows = []
    for T in args.seq_lens:
        B = max(1, args.tokens // T)
        for name, impl in impls.items():
            row = {"T": T, "B": B, "H": args.heads, "D": args.head_dim, "impl": name}
            for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                sec, peak = _measure(impl, B, T, args.heads, args.head_dim, dtype, device, backward,
                                     args.warmup, args.repeats)
                if device == "cpu" and sec is not None:
                    sec = sec[0]                                 # dry run: wall seconds
                row[f"{mode}_ms"] = None if sec is None else sec * 1e3
                row[f"{mode}_tflops"] = None if sec is None else _flops(B, T, args.heads, args.head_dim,
                                                                        backward) / sec / 1e12
                row[f"{mode}_peak_mib"] = None if peak is None else peak / 2**20
            rows.append(row)
            print(f"T={T:6d} B={B:3d} {name:16s} fwd {_fmt(row['fwd_ms']):>9} ms  "
                  f"fwd+bwd {_fmt(row['fwd_bwd_ms']):>9} ms  peak {_fmt(row['fwd_bwd_peak_mib'], '{:.0f}'):>7} MiB",
                  file=sys.stderr)
    return rows


def run_cpu(args) -> list[dict]:
    impls = _implementations(args.variants, "cpu", tuple(args.impls))
    rows = []
    for B, T, H, D in CPU_SHAPES:
        for name, impl in impls.items():
            row = {"T": T, "B": B, "H": H, "D": D, "impl": name}
            for mode, backward in (("fwd", False), ("fwd_bwd", True)):
                (wall, cpu), _ = _measure(impl, B, T, H, D, torch.float32, "cpu", backward, args.warmup,
                                          args.repeats)
                row[f"{mode}_ms"] = cpu * 1e3
                row[f"{mode}_wall_ms"] = wall * 1e3
            rows.append(row)
            print(f"B={B} T={T} H={H} D={D} {name:16s} CPU time: fwd {row['fwd_ms']:8.2f} ms  "
                  f"fwd+bwd {row['fwd_bwd_ms']:8.2f} ms (wall {row['fwd_wall_ms']:.2f} / "
                  f"{row['fwd_bwd_wall_ms']:.2f} ms)", file=sys.stderr)
    return rows


TARGETS = {"lssa": 1.2, "lssar": 1.5}   # forward+backward time / SDPA's (issue 13)


def targets(rows: list[dict]) -> tuple[list[str], dict[str, list[str]]]:
    """Lines judging the issue-13 targets, and the recommended ``auto`` order per variant (fastest
    forward+backward at the longest T where both ran)."""
    lines, order = [], {}
    sdpa = {r["T"]: r for r in rows if r["impl"] == "sdpa"}
    variants = sorted({r["impl"].split(":", 1)[1] for r in rows if ":" in r["impl"]})
    for variant in variants:
        by_kind = {r["impl"].split(":")[0]: {} for r in rows if r["impl"].endswith(":" + variant)}
        for r in rows:
            if r["impl"].endswith(":" + variant):
                by_kind[r["impl"].split(":")[0]][r["T"]] = r
        for kind, per_t in by_kind.items():
            if kind == "eager":
                continue
            if variant in TARGETS:
                worst = [per_t[T]["fwd_bwd_ms"] / sdpa[T]["fwd_bwd_ms"] for T in per_t
                         if per_t[T].get("fwd_bwd_ms") and sdpa.get(T, {}).get("fwd_bwd_ms")]
                if worst:
                    ok = max(worst) <= TARGETS[variant]
                    lines.append(f"- {kind}:{variant} fwd+bwd / SDPA: worst {max(worst):.2f}x "
                                 f"(target <= {TARGETS[variant]}x): {'MET' if ok else 'NOT MET'}")
            mems = sorted((T, r["fwd_bwd_peak_mib"]) for T, r in per_t.items() if r.get("fwd_bwd_peak_mib"))
            if len(mems) >= 2 and mems[0][1] > 0:
                (t0, m0), (t1, m1) = mems[0], mems[-1]
                growth = (m1 / m0) / (t1 / t0)
                lines.append(f"- {kind}:{variant} peak memory T={t0}->{t1}: x{m1 / m0:.1f} for x{t1 / t0:.0f} "
                             f"tokens per row ({'linear' if growth <= 1.5 else 'SUPERLINEAR'})")
        timed = {kind: per_t for kind, per_t in by_kind.items() if kind in ("kernel", "flex", "torch")}
        common = set.intersection(*({T for T, r in pt.items() if r.get("fwd_bwd_ms")} for pt in timed.values())) \
            if timed else set()
        if common:
            T = max(common)
            ranked = sorted(timed, key=lambda kind: timed[kind][T]["fwd_bwd_ms"])
            order[variant] = ranked
            if "kernel" in timed and "flex" in timed:
                ok = timed["kernel"][T]["fwd_bwd_ms"] <= timed["flex"][T]["fwd_bwd_ms"]
                lines.append(f"- kernel:{variant} vs flex:{variant} at T={T}: "
                             f"{timed['kernel'][T]['fwd_bwd_ms']:.2f} vs {timed['flex'][T]['fwd_bwd_ms']:.2f} ms "
                             f"({'kernel at least as fast' if ok else 'FLEX FASTER: auto should prefer flex'})")
    return lines, order


def markdown(rows: list[dict], gpu: bool) -> str:
    """A markdown table with ratios vs SDPA at the same shape."""
    sdpa = {(r["B"], r["T"]): r for r in rows if r["impl"] == "sdpa"}
    unit = "ms" if gpu else "CPU ms"
    head = f"| B | T | H | D | impl | fwd {unit} | fwd+bwd {unit} | fwd ×SDPA | fwd+bwd ×SDPA |"
    if gpu:
        head += " fwd TFLOP/s | fwd+bwd TFLOP/s | peak MiB (fwd+bwd) |"
    else:
        head += " fwd wall ms | fwd+bwd wall ms |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ratio(a, b):
        return "—" if a is None or b is None else f"{a / b:.2f}"

    num = _fmt

    for r in rows:
        ref = sdpa.get((r["B"], r["T"]), {})
        line = (f"| {r['B']} | {r['T']} | {r['H']} | {r['D']} | {r['impl']} | {num(r['fwd_ms'])} | "
                f"{num(r['fwd_bwd_ms'])} | {ratio(r['fwd_ms'], ref.get('fwd_ms'))} | "
                f"{ratio(r['fwd_bwd_ms'], ref.get('fwd_bwd_ms'))} |")
        if gpu:
            line += (f" {num(r['fwd_tflops'])} | {num(r['fwd_bwd_tflops'])} | "
                     f"{num(r['fwd_bwd_peak_mib'], '{:.0f}')} |")
        else:
            line += f" {num(r['fwd_wall_ms'])} | {num(r['fwd_bwd_wall_ms'])} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=DEFAULT_VARIANTS)
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per batch on the GPU (B = tokens // T)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--warmup", type=int, default=None, help="default: 5 on GPU, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on GPU, 5 on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 avoids OpenMP spin-waits "
                             "inflating CPU time on a loaded machine")
    parser.add_argument("--json", default=None, help="also write the rows and the environment here")
    parser.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                        help="implementation kinds (default: sdpa kernel eager on the GPU, sdpa torch eager "
                             "on the CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the GPU code path on the CPU at tiny shapes (CI check of gpu_check.sh)")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("GRAVPROBE_FLEX_COMPILE", "0")
        device = "cuda"                       # the GPU code path, run on the CPU
        args.seq_lens = [s for s in args.seq_lens if s <= 64] or [32, 64]
        args.tokens, args.heads, args.head_dim = min(args.tokens, 128), min(args.heads, 2), min(args.head_dim, 16)
        args.dtype = "float32"
        args.warmup, args.repeats = 0, 1
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
    gpu = device == "cuda"
    if args.impls is None:
        args.impls = ["sdpa", "kernel", "eager"] if gpu else ["sdpa", "torch", "eager"]
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.repeats = args.repeats if args.repeats is not None else (20 if gpu else 5)

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    env["dry_run"] = args.dry_run
    rows = run_gpu(args) if gpu else run_cpu(args)
    print(f"\n{json.dumps(env)}\n")
    print(markdown(rows, gpu))
    checks, order = targets(rows) if gpu else ([], {})
    if checks:
        print("\nTargets (issue 13)" + (" — DRY RUN, numbers meaningless" if args.dry_run else "") + ":")
        print("\n".join(checks))
        print("Recommended auto order per variant (fastest fwd+bwd first): "
              + "; ".join(f"{v}: {' > '.join(o)}" for v, o in order.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "device": "cpu (dry run)" if args.dry_run else device, "rows": rows,
                       "targets": checks, "recommended_order": order}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
