"""Pretraining throughput: training tokens per second of the GPT for each attention variant.

Run the tests first (``pytest tests/test_pretrain_model.py tests/test_pretrain_train.py``). Then::

    python benchmarks/bench_pretrain.py                          # model=tiny and model=small, every variant
    python benchmarks/bench_pretrain.py --models tiny --variants softmax lssar --seconds 2 --json out.json
    # the study's size (2 layers x 32, 1 head, batch 128, T = 100, one thread), new vs old attention code:
    python benchmarks/bench_pretrain.py --models tiny --override model.n_layers=2 model.d_model=32 \
        model.n_heads=1 --batch 128 --seq-len 100 --n-bins 128 --threads 1 --compare-reference \
        --variants softmax lssa lssar lssar:sharpen_power=15

    # today's step vs the code of an earlier commit (model + attention package), side by side in one process:
    python benchmarks/bench_pretrain.py --models tiny --override model.n_layers=2 model.d_model=32 \
        model.n_heads=1 --batch 128 --seq-len 100 --n-bins 128 --threads 1 --baseline fdb5527 \
        --variants softmax lssa lssar:sharpen_power=3 lssar

A variant may carry parameters as ``name:key=value,key=value`` (e.g. ``lssar:sharpen_power=3``).
``--compare-reference`` adds, per variant, a runner whose ``backend="torch"`` attention runs the plain
reference (``reference_attention``: the code before ``attention/eager.py``), so old and new are measured
side by side in one process. ``--baseline REV`` adds, per variant, a runner (label ``[base]``) whose model is
``pretrain/model.py`` and the ``attention/`` package exactly as committed at git revision ``REV`` (extracted
with ``git show`` into a temporary package and imported next to the current code), same config, seed and
batch. ``--cpu-allocator`` (process-wide) is ``heap`` as in training (``train.cpu_allocator``) or ``system``
(glibc's defaults); the ``faults`` column is minor page faults per step. ``--clock process`` (default) times process CPU seconds, which a shared
machine disturbs far less than wall time; ``--clock wall`` times wall seconds.

For each model preset (``conf/model/<name>.yaml``) and variant, one full optimiser step (forward and
backward on a batch of orbit sequences at the preset's context, AdamW update, gradient clipping) is
repeated after ``--warmup`` steps in ``--rounds`` windows that cycle through the variants (so load spikes
on a shared machine hit every variant), ``--seconds`` per variant in all; the best window counts;
tokens/s = batch x context x steps / time.
Each variant is reported as a ratio against ``softmax`` measured in the same run (same process, same
load), which is the number to compare across machines. Batches are random tokens over
``n_bins + 3`` ids (speed does not depend on their values). On CUDA the step runs under bf16 autocast,
as in training.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gravprobe.attention import VARIANTS, dispatch
from gravprobe.attention.reference import _reference
from gravprobe.pretrain.model import GPT
from gravprobe.pretrain.train import make_optimizer, model_config

from gravprobe.common import set_cpu_allocator


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """``"lssar:sharpen_power=3,offset=1"`` -> ``("lssar", ["attention.params.sharpen_power=3", ...])``."""
    name, _, rest = spec.partition(":")
    return name, [f"attention.params.{kv}" for kv in rest.split(",") if kv]


def preset(name: str, variant: str, n_bins: int, overrides: list[str] = ()):
    from hydra import compose, initialize_config_module

    variant, params = parse_variant(variant)
    with initialize_config_module("gravprobe.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}", f"attention={variant}", *params, *overrides])
    return cfg, model_config(cfg, orbit_vocab=n_bins + 3, text_vocab=0)


_BASELINES: dict[str, Any] = {}


def baseline_model(rev: str) -> Any:
    """The model module (``GPT``, ``GPTConfig``) of git revision ``rev``: ``pretrain/model.py`` and ``attention/*.py`` as committed there,
    written to a temporary directory as the package ``gp_base_<rev>_attention`` and the module
    ``gp_base_<rev>_model`` (whose ``from gravprobe.attention import`` is pointed at that package)."""
    if rev not in _BASELINES:
        root = Path(__file__).resolve().parents[1]

        def show(path: str) -> str:
            return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], check=True,
                                  capture_output=True, text=True).stdout

        files = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, "attention/"], check=True,
                               capture_output=True, text=True).stdout.split()
        tag = "".join(c if c.isalnum() else "_" for c in rev)
        dst = Path(tempfile.mkdtemp(prefix="gravprobe_baseline_"))
        pkg = dst / f"gp_base_{tag}_attention"
        pkg.mkdir()
        for f in files:
            if f.endswith(".py"):
                (pkg / Path(f).name).write_text(show(f))
        model = show("pretrain/model.py")
        if "from gravprobe.attention import" not in model:
            raise RuntimeError(f"{rev}:pretrain/model.py does not import gravprobe.attention as expected")
        (dst / f"gp_base_{tag}_model.py").write_text(
            model.replace("from gravprobe.attention import", f"from gp_base_{tag}_attention import"))
        sys.path.insert(0, str(dst))
        _BASELINES[rev] = importlib.import_module(f"gp_base_{tag}_model")
    return _BASELINES[rev]


class Runner:
    """One model + optimiser + fixed batch; ``window(seconds)`` -> tokens/s over whole optimiser steps."""

    def __init__(self, name: str, variant: str, *, batch: int, seq_len: int | None, n_bins: int,
                 device: torch.device, warmup: int, overrides: list[str] = (), reference: bool = False,
                 clock=time.perf_counter, baseline: str | None = None) -> None:
        cfg, mcfg = preset(name, variant, n_bins, overrides)
        self.name, self.variant, self.batch, self.device = name, variant, batch, device
        self.label = variant + (" [ref]" if reference else "") + (" [base]" if baseline else "")
        self.reference, self.baseline, self.clock = reference, baseline, clock
        self.T = seq_len or mcfg.block_size
        self.steps = self.faults = 0          # over every window: minor page faults per step
        torch.manual_seed(0)
        if baseline:
            base = baseline_model(baseline)
            self.model = base.GPT(base.GPTConfig(**mcfg.to_dict())).to(device)
        else:
            self.model = GPT(mcfg).to(device)
        self.opt = make_optimizer(self.model, cfg.train)
        if mcfg.orbit_mode == "continuous":
            self.x = torch.randn(batch, self.T + 1, 2, device=device)
            self.x[:, 0] = float("nan")                            # the dt marker
        else:
            self.x = torch.randint(0, n_bins, (batch, self.T + 1, 2), device=device)
            self.x[:, 0] = n_bins
        for _ in range(warmup):
            self.step()

    def step(self) -> None:
        # the "old code" runner: backend="torch" as it was before attention/eager.py (the plain reference)
        fast = dispatch._eager                  # the torch backend, called with resolved params
        if self.reference:
            dispatch._eager = _reference
        try:
            self.opt.zero_grad(set_to_none=True)
            with (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                  else torch.autocast("cpu", enabled=False)):
                loss = self.model(orbits=self.x)["orbits"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        finally:
            dispatch._eager = fast

    def window(self, seconds: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, self.clock()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        while True:
            self.step()
            n += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = self.clock() - t0
            if dt >= seconds and n >= 2:
                self.steps += n
                self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                return self.batch * self.T * n / dt


class RemoteRunners:
    """Runners built and timed in a child process with its own CPU allocator setting (``--baseline-allocator``):
    the parent and the child take turns, one window at a time, so both see the same machine and load, and
    only one of them computes at any moment. ``runner(i)`` is a stand-in with :class:`Runner`'s interface."""

    def __init__(self, allocator: str, threads: int | None, specs: list[dict]) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_remote_main, args=(child, allocator, threads, specs), daemon=True)
        self.proc.start()
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        self.allocator, self.specs = allocator, specs
        self.msg, self.info = reply

    def runner(self, i: int) -> _Remote:
        return _Remote(self, i)

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


class _Remote:
    def __init__(self, host: RemoteRunners, i: int) -> None:
        self.host, self.i = host, i
        spec, info = host.specs[i], host.info[i]
        self.variant, self.reference, self.baseline = spec["variant"], spec["reference"], spec["baseline"]
        self.label = info["label"] + " [" + host.allocator + "]"
        self.T, self.params, self.params_ne = info["T"], info["params"], info["params_ne"]
        self.steps = self.faults = 0

    def window(self, seconds: float) -> float:
        self.host.conn.send((self.i, seconds))
        tokens_per_s, steps, faults = self.host.conn.recv()
        self.steps, self.faults = self.steps + steps, self.faults + faults
        return tokens_per_s


def _remote_main(conn, allocator: str, threads: int | None, specs: list[dict]) -> None:
    try:
        msg = set_cpu_allocator(allocator)
        if threads:
            torch.set_num_threads(threads)
        runners = [Runner(**spec) for spec in specs]
        conn.send((msg, [{"label": r.label, "T": r.T, "params": r.model.num_params(),
                          "params_ne": r.model.num_params(True)} for r in runners]))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(exc)
        return
    while (job := conn.recv()) is not None:
        r = runners[job[0]]
        s0, f0 = r.steps, r.faults
        tps = r.window(job[1])
        conn.send((tps, r.steps - s0, r.faults - f0))


def _params(r, non_embedding: bool = False) -> int:
    if isinstance(r, _Remote):
        return r.params_ne if non_embedding else r.params
    return r.model.num_params(non_embedding)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the preset's block_size")
    ap.add_argument("--n-bins", type=int, default=1000, help="orbit bins V (vocabulary V + 3)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per (model, variant)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timing windows per variant (the best one counts)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--override", nargs="*", default=[], help="Hydra overrides for every runner "
                    "(e.g. model.n_layers=2 model.d_model=32 model.n_heads=1)")
    ap.add_argument("--compare-reference", action="store_true",
                    help="also time each variant with the old plain-reference attention (same process)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="also time each variant with pretrain/model.py + attention/ as committed at git REV")
    ap.add_argument("--clock", choices=("process", "wall"), default="process",
                    help="process CPU time (default; robust on a shared machine) or wall time")
    ap.add_argument("--cpu-allocator", choices=("heap", "system"), default="heap",
                    help="process-wide, as train.cpu_allocator: heap (training's default: freed memory stays "
                         "in glibc's heap) or system (glibc's defaults: a page fault per page per step)")
    ap.add_argument("--baseline-allocator", choices=("same", "heap", "system"), default="same",
                    help="with --baseline: time the baseline's runners in a child process with this CPU "
                         "allocator (the code before train.cpu_allocator ran with glibc's defaults: system), "
                         "taking turns with this process window by window")
    args = ap.parse_args(argv)
    unknown = sorted({parse_variant(v)[0] for v in args.variants} - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    variants = ["softmax"] + [v for v in args.variants if v != "softmax"]
    clock = time.process_time if args.clock == "process" and args.device == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    allocator = set_cpu_allocator(args.cpu_allocator) if device.type == "cpu" else "-"
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, V {args.n_bins}, clock {args.clock}, "
          f"overrides {args.override}\n# {allocator}")
    print(f"{'model':<8} {'variant':<37} {'T':>5} {'params':>9} {'tokens/s':>10} {'ms/step':>8} "
          f"{'vs softmax':>10} {'faults':>7} {'new/this':>9}")
    if args.baseline_allocator != "same" and not (args.baseline and device.type == "cpu"):
        ap.error("--baseline-allocator needs --baseline REV on the CPU")
    remote_base = args.baseline_allocator not in ("same", args.cpu_allocator)
    rows = []
    for name in args.models:
        runners, specs, host = [], [], None
        for v in variants:
            kinds = [(False, None)] + ([(True, None)] if args.compare_reference else []) + \
                ([(False, args.baseline)] if args.baseline else [])
            for ref, base in kinds:
                spec = {"name": name, "variant": v, "batch": args.batch, "seq_len": args.seq_len,
                        "n_bins": args.n_bins, "device": device, "warmup": args.warmup,
                        "overrides": args.override, "reference": ref, "clock": clock, "baseline": base}
                if base and remote_base:
                    specs.append(spec)
                    runners.append(len(specs) - 1)
                else:
                    runners.append(Runner(**spec))
        if specs:
            host = RemoteRunners(args.baseline_allocator, args.threads, specs)
            print(f"# baseline runners in a child process: {host.msg}")
            runners = [host.runner(r) if isinstance(r, int) else r for r in runners]
        # rounds cycle through the variants so that a load spike hits all of them; best window per variant
        best = {r.label: 0.0 for r in runners}
        for _ in range(args.rounds):
            for r in runners:
                best[r.label] = max(best[r.label], r.window(args.seconds / args.rounds))
        if host is not None:
            host.close()
        for r in runners:
            base = best["softmax" + r.label[len(r.variant):]]
            row = {"model": name, "variant": r.variant, "reference": r.reference, "baseline": r.baseline,
                   "batch": args.batch,
                   "seq_len": r.T, "params": _params(r), "params_non_embedding": _params(r, True),
                   "tokens_per_s": best[r.label], "ms_per_step": 1e3 * args.batch * r.T / best[r.label],
                   "ratio_vs_softmax": best[r.label] / base, "page_faults_per_step": r.faults / max(1, r.steps)}
            if r.label != r.variant:                      # new code vs this old one, same variant, same run
                row["new_vs_this"] = best[r.variant] / best[r.label]
            rows.append(row)
            extra = f" {row['new_vs_this']:>8.2f}x" if "new_vs_this" in row else ""
            print(f"{name:<8} {r.label:<37} {r.T:>5} {row['params']:>9,} {row['tokens_per_s']:>10,.0f} "
                  f"{row['ms_per_step']:>8.1f} {row['ratio_vs_softmax']:>10.2f} "
                  f"{row['page_faults_per_step']:>7.0f}{extra}", flush=True)
        del runners
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "threads": torch.get_num_threads(), "clock": args.clock,
                       "cpu_allocator": allocator,
                       "overrides": args.override, "baseline": args.baseline, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
