"""`gravprobe pretrain`: mixed orbit + text pretraining of the GPT, checkpoints/resume, DDP, evaluation.

``main(cfg, run_dir)`` (called by the CLI with the composed Hydra config):

1. ensures the orbit dataset of ``cfg.data`` (``gravprobe.orbits.ensure_dataset`` under
   ``dataset_path(spec, seed, home, out)``, or the existing folder ``cfg.train.dataset``) and, when
   ``train.text_ratio > 0``, the tokenised text corpus of ``cfg.text``;
2. builds the model (``cfg.model`` + ``cfg.attention``), AdamW (warm-up + cosine), and resumes from
   ``run_dir/checkpoints/last.pt`` when present (``train.resume=auto``);
3. trains with deterministic mixed batches (``pretrain/data.py``), gradient clipping, bf16 autocast on CUDA,
   a progress bar, metrics per modality in ``run_dir/metrics.csv`` (and TensorBoard if installed),
   validation every ``eval_every`` steps and atomic checkpoints every ``ckpt_every`` steps;
4. evaluates length extrapolation and writes ``results.json["pretrain"]`` (numbers only: the report,
   ``gravprobe.report.draw_figures``, draws the loss curves and length-extrapolation figures from
   ``metrics.csv`` and ``results.json``).

Under ``torchrun`` (``WORLD_SIZE > 1``) it runs DDP (NCCL on CUDA, gloo on CPU); rank 0 writes all files.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gravprobe.common import arm_label, code_version, output_root, set_cpu_allocator, update_results
from gravprobe.config import TrainConfig, select, to_container

from .checkpoint import (  # CHECKPOINT_FORMAT, load_checkpoint: still importable from here
    CHECKPOINT_FORMAT,  # noqa: F401
    LAST,
    CheckpointError,
    check_checkpoint_space,
    describe_nonfinite,
    estimate_checkpoint_bytes,
    load_checkpoint,  # noqa: F401
    newest_good_checkpoint,
    nonfinite_tensors,
    read_checkpoint,
    save_checkpoint,
    sweep_temporary_files,
)
from .data import DatasetMismatchError, MixedBatches, OrbitSource
from .evaluate import length_extrapolation, mean_loss, n_targets
from .model import GPT, GPTConfig

log = logging.getLogger(__name__)

METRIC_FIELDS = ["step", "split", "modality", "loss", "lr", "tokens", "wall_s"]


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss, the gradient norm, the weights or the optimiser state became NaN/inf.
    Raised before the step is applied or the checkpoint written, so every kept checkpoint stays good; the
    message names the step, the last good checkpoint and what to change."""


# --------------------------------------------------------------------------------------------- helpers
def train_config(train_cfg: Any) -> TrainConfig:
    """``cfg.train`` (an OmegaConf node, a dict — missing keys from ``conf/train/default.yaml`` — or a
    :class:`~gravprobe.config.TrainConfig`) as the typed, validated section; raises ``ConfigError``."""
    return train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_cfg(train_cfg)


def _home(cfg: Any) -> Path:
    home = select(cfg, "home")
    return Path(home).expanduser().resolve() if home else output_root()


class _Dist:
    """Process-group facts: rank, world size and device; DDP under torchrun, plain otherwise."""

    def __init__(self, device_pref: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_pref not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={device_pref!r}; choose auto, cpu or cuda")
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available; use device=auto or device=cpu")
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.started = False
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
            self.started = True

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.ddp:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


SCHEDULES = ("cosine", "step", "constant")


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
              drop_at: float = 0.5) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then

    - ``cosine``: cosine decay to ``min_ratio`` at the last step (nanoGPT);
    - ``step``: constant, multiplied by ``min_ratio`` from step ``drop_at * total`` on (Liu et al.: x0.1 at half);
    - ``constant``: constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}; choose one of {SCHEDULES}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return min_ratio if step >= int(drop_at * total) else 1.0
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, tc: Any) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings (dim >= 2) only; ``tc``: ``cfg.train`` or a
    :class:`~gravprobe.config.TrainConfig`."""
    tc = train_config(tc)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                             betas=tuple(float(b) for b in tc.betas))


def model_config(cfg: Any, orbit_vocab: int, text_vocab: int) -> GPTConfig:
    """``GPTConfig`` from ``cfg.model`` and ``cfg.attention`` plus the data-derived vocabularies."""
    m = to_container(cfg.model)
    fields = {k: v for k, v in m.items() if k != "name"}
    unknown = sorted(set(fields) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid: {sorted(GPTConfig.__dataclass_fields__)}")
    return GPTConfig(**fields, orbit_vocab=orbit_vocab, text_vocab=text_vocab,
                     attention=to_container(cfg.attention))


# ---------------------------------------------------------------------------------------- RNG states
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------- metrics
class _Metrics:
    """Appends rows to ``metrics.csv`` (rank 0); on resume drops rows logged after the checkpoint."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, METRIC_FIELDS)
                w.writeheader()
                w.writerows(rows)
        elif not self.path.exists() or resume_step is None:
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, METRIC_FIELDS).writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard not installed: CSV only
            self.tb = None

    def log(self, step: int, split: str, losses: Mapping[str, float], lr: float, tokens: int, wall: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, METRIC_FIELDS)
            for mod, loss in losses.items():
                w.writerow({"step": step, "split": split, "modality": mod, "loss": f"{loss:.6f}",
                            "lr": f"{lr:.6g}", "tokens": tokens, "wall_s": f"{wall:.2f}"})
                if self.tb is not None:
                    self.tb.add_scalar(f"{split}/{mod}", loss, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ------------------------------------------------------------------------------------------------- main
def _ensure_orbits(cfg: Any, dist: _Dist, tc: TrainConfig | None = None):
    from gravprobe.orbits import config_dataset_path, ensure_dataset, load_dataset

    spec, default_path = config_dataset_path(cfg, "data")  # ${home}/data/<name>-<hash8>-s<seed>, or out=
    explicit = (tc or train_config(cfg.train)).dataset
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "manifest.json").is_file():
            raise DatasetMismatchError(f"train.dataset={path} holds no orbit dataset (no manifest.json); run "
                                       f"`gravprobe generate out={path}` or set train.dataset=null")
    else:
        path = default_path
        if dist.rank == 0:
            ensure_dataset(spec, path, seed=cfg.seed, workers=int(cfg.workers))
        dist.barrier()
    ds = load_dataset(path)
    if ds.spec.spec_hash() != spec.spec_hash():
        theirs, ours = ds.spec.to_dict(), spec.to_dict()
        diff = {k: (theirs.get(k), ours.get(k)) for k in ours if theirs.get(k) != ours.get(k)}
        vital = sorted(set(diff) & {"n_bins", "coord_range", "dt_choices", "mode", "system"})
        if vital:
            raise DatasetMismatchError(f"dataset {path} does not match cfg.data in {vital} (dataset, config): "
                                       f"{ {k: diff[k] for k in vital} }; use a matching data=... or another "
                                       "train.dataset")
        log.warning("dataset %s differs from cfg.data in %s; training on the dataset as it is", path, diff)
        spec = ds.spec
    n_bins = int(ds.spec.n_bins)
    return spec, path, ds, n_bins


def main(cfg: Any, run_dir: str | Path) -> dict:
    """Pretrain per ``cfg`` into ``run_dir``; returns ``{"checkpoint", "steps", "loss", "length_extrapolation"}``."""
    run_dir = Path(run_dir)
    dist = _Dist(str(cfg.device))
    if dist.ddp:  # Hydra's timestamped run folder can differ between processes by a second: use rank 0's
        shared = [str(run_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    try:
        return _train(cfg, run_dir, dist)
    finally:
        dist.close()


def _train(cfg: Any, run_dir: Path, dist: _Dist) -> dict:
    """The training loop: set up, resume, step (log, validate, checkpoint) until ``train.steps`` or
    ``train.stop_at``, then the final evaluation."""
    from gravprobe.common import progress

    run = _setup(cfg, run_dir, dist)
    _resume(run)
    _wrap_ddp(run)
    tc = run.tc
    steps = tc.steps
    stop = min(steps, tc.stop_at) if tc.stop_at is not None else steps
    eval_every, ckpt_every, log_every = tc.eval_every, tc.ckpt_every, tc.log_every
    metrics = _Metrics(run_dir, run.is_main, run.step if run.resumed else None)
    run.t0 = time.time()
    if run.step == 0 and run.is_main:
        run.first = run.evaluate()
        metrics.log(0, "val", run.first, run.scheduler.get_last_lr()[0], 0, 0.0)
        log.info("step 0: val %s", _fmt(run.first))
    run.model.train()
    bar = progress(total=stop, initial=run.step, desc=f"pretrain {run.mcfg.attention.get('name')}",
                   disable=not run.is_main, dynamic_ncols=True)
    sums = torch.zeros(4, dtype=torch.float64)   # orbit loss*tokens, orbit tokens, text loss*tokens, text tokens
    try:
        while run.step < stop:
            lr = run.scheduler.get_last_lr()[0]
            sums += _train_step(run)
            bar.update(1)
            if run.step % log_every == 0 or run.step == stop:
                avg = _mean_losses(sums)
                metrics.log(run.step, "train", avg, lr, run.tokens_seen * dist.world, run.wall())
                bar.set_postfix({k: f"{v:.3f}" for k, v in avg.items()})
                sums.zero_()
            if eval_every and run.step % eval_every == 0 and run.step != stop and run.is_main:
                val = run.evaluate()
                metrics.log(run.step, "val", val, lr, run.tokens_seen * dist.world, run.wall())
                log.info("step %d: val %s", run.step, _fmt(val))
            if (ckpt_every and run.step % ckpt_every == 0) or run.step == stop:
                _checkpoint(run)
        bar.close()
        if stop < steps:
            if run.is_main:
                log.info("stopped at step %d of %d (train.stop_at); resume with the same run folder", stop, steps)
            return {"checkpoint": str(run.ckpt_path), "steps": run.step, "stopped": True}
        if not run.is_main:
            return {"checkpoint": str(run.ckpt_path), "steps": run.step}
        return _finish(run, metrics)
    finally:
        bar.close()
        metrics.close()


@dataclass
class _Run:
    """One pretraining run in memory: what :func:`_setup` builds and the counters the loop advances."""

    cfg: Any
    tc: TrainConfig                # cfg.train, typed and validated
    run_dir: Path
    dist: _Dist
    bf16: bool
    spec: Any                      # the DatasetSpec trained on
    ds_path: Path
    ds: Any                        # the loaded orbit dataset
    corpus: Any                    # the text corpus, or None (orbits only)
    mcfg: GPTConfig
    orbit_len: int
    text_len: int
    source: OrbitSource
    batches: MixedBatches
    raw_model: GPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    model: nn.Module = None        # the DDP wrapper under torchrun (``_wrap_ddp``), else ``raw_model``
    step: int = 0                  # optimiser steps taken
    first: dict = field(default_factory=dict)   # the step-0 validation loss per modality
    tokens_seen: int = 0           # training tokens of this process
    wall_before: float = 0.0       # seconds spent before the resumed checkpoint
    t0: float = field(default_factory=time.time)
    resumed: bool = False
    last_good: tuple[Path, int] | None = None   # the newest checkpoint known to be good: (path, step)
    val_orbits: list = field(default_factory=list)   # the fixed validation batches
    val_text: list = field(default_factory=list)
    version: str = ""              # gravprobe version + git commit, recorded once per run in every checkpoint

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / LAST

    @property
    def orbit_loss(self) -> str:
        return self.tc.orbit_loss

    @property
    def data_meta(self) -> dict:
        return {"path": str(self.ds_path), "spec": self.spec.to_dict(), "spec_hash": self.spec.spec_hash(),
                "n_bins": int(self.spec.n_bins), "seed": int(self.cfg.seed),
                "seq_len": int(self.ds.tokens.shape[1])}

    def wall(self) -> float:
        """Training seconds so far, including those before a resume."""
        return self.wall_before + time.time() - self.t0

    def evaluate(self) -> dict[str, float]:
        """Validation loss per modality on the fixed validation batches."""
        res = {"orbits": mean_loss(self.raw_model, self.val_orbits, "orbits", self.dist.device, self.bf16,
                                   self.orbit_loss)}
        if self.val_text:
            res["text"] = mean_loss(self.raw_model, self.val_text, "text", self.dist.device, self.bf16)
        return res


def _setup(cfg: Any, run_dir: Path, dist: _Dist) -> _Run:
    """Check the training options, load the data, build the model, AdamW and the schedule (fresh weights)."""
    tc = train_config(cfg.train)   # ConfigError (a ValueError) names every bad key before any work
    is_main = dist.rank == 0
    seed = int(cfg.seed)
    device = dist.device
    bf16 = device.type == "cuda" and tc.precision in ("auto", "bf16")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        set_cpu_allocator(tc.cpu_allocator)      # logs once per process (the CLI may have set it already)

    # ---- data
    spec, ds_path, ds, n_bins = _ensure_orbits(cfg, dist, tc)
    text_ratio = tc.text_ratio
    corpus = None
    if text_ratio > 0:
        from .text import load_text_corpus

        if is_main:
            corpus = load_text_corpus(cfg.text, _home(cfg))
        dist.barrier()
        if not is_main:
            corpus = load_text_corpus(cfg.text, _home(cfg), rank=dist.rank)
    mcfg = model_config(cfg, orbit_vocab=n_bins + 3, text_vocab=corpus.vocab_size if corpus else 0)
    orbit_len = tc.seq_len if tc.seq_len else min(int(ds.tokens.shape[1]) - 1, mcfg.block_size)
    text_len = tc.text_seq_len or orbit_len
    if mcfg.position == "learned" and max(orbit_len, text_len) > mcfg.block_size:
        from .model import SequenceTooLongError

        raise SequenceTooLongError(f"training context {max(orbit_len, text_len)} exceeds the learned-position "
                                   f"model.block_size={mcfg.block_size}; raise model.block_size or lower train.seq_len")
    source = OrbitSource(ds.tokens, getattr(ds, "positions", None), n_bins,
                         tc.val_fraction, mcfg.orbit_mode)
    batches = MixedBatches(source, corpus.train if corpus else None, batch_size=tc.batch_size,
                           text_ratio=text_ratio, orbit_len=orbit_len, text_len=text_len, seed=seed,
                           text_val=corpus.val if corpus else None)
    if text_ratio > 0 and batches.n_text == 0:
        log.warning("train.text_ratio=%g of train.batch_size=%d rounds to 0 text sequences per batch; no text "
                    "is trained (raise one of them)", text_ratio, tc.batch_size)
    batches.micro_batches(0, dist.rank, dist.world, tc.grad_accum)  # validates divisibility early

    # ---- model, optimiser, schedule
    torch.manual_seed(seed)            # the same initial weights in every process
    np.random.seed(seed)
    random.seed(seed)
    model = GPT(mcfg).to(device)
    torch.manual_seed(seed + dist.rank)  # per-process streams (context noise, dropout)
    if is_main:
        log.info("model: %s attention, %d layers, width %d, %.3fM parameters (%.3fM non-embedding); "
                 "device %s x %d; orbit context %d, text context %s", mcfg.attention.get("name"),
                 mcfg.n_layers, mcfg.d_model, model.num_params() / 1e6, model.num_params(True) / 1e6,
                 device, dist.world, orbit_len, text_len if corpus else "-")
    steps = tc.steps
    optimizer = make_optimizer(model, tc)
    warmup, min_ratio = tc.warmup_steps, tc.min_lr_ratio
    schedule, drop_at = tc.schedule, tc.lr_drop_at
    lr_factor(0, warmup, steps, min_ratio, schedule, drop_at)  # validates the schedule name before any work
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, steps, min_ratio, schedule, drop_at))
    n_val = tc.eval_batches
    return _Run(cfg=cfg, tc=tc, run_dir=run_dir, dist=dist, bf16=bf16, spec=spec, ds_path=ds_path, ds=ds,
                corpus=corpus,
                mcfg=mcfg, orbit_len=orbit_len, text_len=text_len, source=source, batches=batches,
                raw_model=model, optimizer=optimizer, scheduler=scheduler, model=model,
                val_orbits=batches.val_orbit_batches(n_val, max(1, tc.batch_size - batches.n_text)),
                val_text=batches.val_text_batches(n_val, max(1, batches.n_text)), version=code_version())


def _resume(run: _Run) -> None:
    """Continue from a checkpoint per ``train.resume`` and prepare the checkpoint folder.

    ``auto``: the newest kept checkpoint that verifies (``last.pt``, else ``prev.pt``, saying why), or a
    fresh start when the run has none; ``true``: the same, but one must exist; ``false``: a fresh start;
    a PATH: that file, which must verify. Restores weights, optimiser, schedule, counters and every
    process's RNG state, so the run continues exactly as if never stopped. Rank 0 also removes the
    temporary files of a killed checkpoint write and checks that the disk can hold the checkpoints to come.
    """
    ckpt_dir = run.ckpt_path.parent
    if run.is_main:
        sweep_temporary_files(ckpt_dir)
    resume = run.tc.resume
    path: Path | None = None
    ckpt: dict | None = None
    if isinstance(resume, str) and resume not in ("auto", "true", "false", "True", "False"):
        path = Path(resume).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"train.resume={path} does not exist")
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"train.resume={path}: {e}; pass another checkpoint, or train.resume=auto for "
                                  f"the newest one of {ckpt_dir} that verifies") from e
    elif resume in (True, "true", "True", "auto"):
        path, ckpt = _newest_good(run, ckpt_dir)
        if path is None and resume != "auto":
            raise FileNotFoundError(f"train.resume=true but {run.ckpt_path} does not exist")
    if ckpt is not None:
        _restore(run, path, ckpt)
    if run.is_main:
        check_checkpoint_space(ckpt_dir, estimate_checkpoint_bytes(run.raw_model))


def _newest_good(run: _Run, ckpt_dir: Path) -> tuple[Path | None, dict | None]:
    """Rank 0 picks the newest kept checkpoint that verifies (moving damaged ones aside) and says why when
    it is not ``last.pt``; every other rank then reads the same file."""
    ckpt = None
    choice: list[Any] = [None, []]
    if run.is_main:
        path, ckpt, problems = newest_good_checkpoint(ckpt_dir, move_damaged=True)
        choice = [str(path) if path else None, problems]
    if run.dist.ddp:
        torch.distributed.broadcast_object_list(choice, src=0)
    chosen, problems = choice
    if chosen is None and problems:
        raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: {'; '.join(problems)}. Start again with "
                              "train.resume=false or in a new run folder")
    if chosen is None:
        return None, None
    if ckpt is None:
        ckpt = read_checkpoint(chosen)
    elif problems:
        log.warning("resuming from %s (step %d), the newest checkpoint that verifies: %s", chosen, ckpt["step"],
                    "; ".join(problems))
    return Path(chosen), ckpt


def _restore(run: _Run, path: Path, ckpt: dict) -> None:
    """Load a verified checkpoint's states into the run after checking it fits the model and the data."""
    data_meta = run.data_meta
    if ckpt.get("model_config") != run.mcfg.to_dict():
        diff = {k: (ckpt.get("model_config", {}).get(k), v) for k, v in run.mcfg.to_dict().items()
                if ckpt.get("model_config", {}).get(k) != v}
        raise ValueError(f"cannot resume {path}: model config differs (checkpoint, now): {diff}")
    if ckpt["dataset"]["spec_hash"] != data_meta["spec_hash"] or ckpt["dataset"]["seed"] != data_meta["seed"]:
        raise DatasetMismatchError(f"cannot resume {path}: it was trained on dataset "
                                   f"{ckpt['dataset']['path']} (spec {ckpt['dataset']['spec_hash'][:8]}, "
                                   f"seed {ckpt['dataset']['seed']}), the config now names {run.ds_path}")
    run.raw_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.step, run.first = int(ckpt["step"]), dict(ckpt.get("first_val_loss", {}))
    run.tokens_seen, run.wall_before = int(ckpt.get("tokens", 0)), float(ckpt.get("wall_s", 0.0))
    rngs = ckpt.get("rng") or []
    if rngs:
        _set_rng_state(rngs[run.dist.rank] if run.dist.rank < len(rngs) else rngs[0])
    run.resumed, run.last_good = True, (path, run.step)
    if run.is_main:
        log.info("resumed from %s at step %d", path, run.step)


def _wrap_ddp(run: _Run) -> None:
    """Under torchrun: wrap the model in DDP (after a resume loaded the plain model's weights)."""
    if run.dist.ddp:
        # broadcast_buffers=False: the only buffers are RoPE cos/sin caches that each process grows on demand
        # (rank 0 evaluates alone, so their sizes differ); find_unused_parameters: a process's micro-batch
        # may hold no sequence of one modality.
        import inspect

        no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(nn.parallel.DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        device = run.dist.device
        run.model = nn.parallel.DistributedDataParallel(
            run.raw_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=run.corpus is not None, **no_sync_buffers)


def _train_step(run: _Run) -> torch.Tensor:
    """One optimiser step over the global batch of step ``run.step``; returns this step's loss sums
    ``[orbit loss*tokens, orbit tokens, text loss*tokens, text tokens]`` (all processes).

    The objective: per modality the mean loss over all its target tokens in the global batch, weighted by
    the modality's share of sequences. Token counts are summed over micro-batches and ranks first, so
    ``grad_accum`` and DDP give the gradient of exactly this objective. Nothing is applied when the loss or
    the gradient norm is not finite; weights that stop being finite in the update stop the run too (before
    any checkpoint): both raise :class:`NonFiniteLossError`.
    """
    tc, dist, device, raw = run.tc, run.dist, run.dist.device, run.raw_model
    B, n_text = tc.batch_size, run.batches.n_text
    micro = run.batches.micro_batches(run.step, dist.rank, dist.world, tc.grad_accum)
    run.optimizer.zero_grad(set_to_none=True)
    n_tok = [(n_targets(raw, mb.orbits, "orbits", run.orbit_loss), n_targets(raw, mb.text, "text"))
             for mb in micro]
    counts = torch.tensor([sum(c[0] for c in n_tok), sum(c[1] for c in n_tok)], dtype=torch.float64)
    if dist.ddp:
        torch.distributed.all_reduce(counts)
    weight = {"orbits": (B - n_text) / B / max(float(counts[0]), 1.0),
              "text": n_text / B / max(float(counts[1]), 1.0)}
    local = torch.zeros(4, dtype=torch.float64)
    for i, (mb, (no, nt)) in enumerate(zip(micro, n_tok)):
        o = torch.from_numpy(mb.orbits).to(device)
        t = torch.from_numpy(mb.text).to(device)
        sync = contextlib.nullcontext() if (not dist.ddp or i == len(micro) - 1) else run.model.no_sync()
        with sync:
            with _autocast(device, run.bf16):
                losses = run.model(orbits=o if no else o[:0], text=t if nt else t[:0],
                                   orbit_targets=run.orbit_loss)
            n = {"orbits": no, "text": nt}
            loss = sum(losses[k] * (n[k] * weight[k] * dist.world) for k in losses)
            loss.backward()
        if "orbits" in losses:
            local[0] += float(losses["orbits"].detach()) * no
            local[1] += no
        if "text" in losses:
            local[2] += float(losses["text"].detach()) * nt
            local[3] += nt
        run.tokens_seen += (mb.orbits.shape[1] - 1) * len(o) + (mb.text.shape[1] - 1) * len(t)
    if dist.ddp:
        torch.distributed.all_reduce(local)
    step_losses = _mean_losses(local)
    bad = [k for k, v in step_losses.items() if not math.isfinite(v)]
    if bad:
        raise _nonfinite(run, f"non-finite {'/'.join(bad)} training loss ({_fmt(step_losses)})")
    params = [p for p in raw.parameters() if p.grad is not None]
    grad_norm = nn.utils.get_total_norm([p.grad for p in params])   # the norm clipping uses: one fused pass
    if not bool(torch.isfinite(grad_norm)):
        raise _nonfinite(run, f"non-finite gradient norm ({float(grad_norm)}) with a finite loss "
                              f"({_fmt(step_losses)})")
    clip = tc.grad_clip
    if clip > 0:
        nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    weight_max = nn.utils.get_total_norm(list(raw.parameters()), norm_type=math.inf)  # max |w|; NaN propagates
    if not bool(torch.isfinite(weight_max)):
        raise _nonfinite(run, f"weights that became non-finite in the update (max |w| = {float(weight_max)})",
                         applied=True)
    return local


def _mean_losses(sums: torch.Tensor) -> dict[str, float]:
    """Per-modality mean loss from ``[orbit loss*tokens, orbit tokens, text loss*tokens, text tokens]``."""
    out = {}
    if sums[1] > 0:
        out["orbits"] = float(sums[0] / sums[1])
    if sums[3] > 0:
        out["text"] = float(sums[2] / sums[3])
    return out


def _nonfinite(run: _Run, what: str, *, applied: bool = False) -> NonFiniteLossError:
    """The error for a diverging run: the step, what was found, the last checkpoint that really is good
    (written after the same checks, or verified on resume) and what to change."""
    tc = run.tc
    step = run.step if applied else run.step + 1
    if run.last_good is not None:
        where = f"the last good checkpoint is {run.last_good[0]} (step {run.last_good[1]}), checked finite"
    else:
        where = "no checkpoint was written yet"
    done = "no checkpoint was written from it" if applied else "the step was not applied"
    fix = (f"Lower train.lr (now {tc.lr:g}), raise train.warmup_steps (now {tc.warmup_steps}) or keep "
           f"train.grad_clip on (now {tc.grad_clip:g}), or check the data; start again in a new run folder (a "
           "resume restores the old schedule)")
    return NonFiniteLossError(f"{what} at step {step}; training stopped and {done}; {where}. {fix}")


def _state(run: _Run) -> dict:
    """Everything a resume needs, as a checkpoint dict (every rank joins the RNG gather under DDP)."""
    rng = _rng_state()
    if run.dist.ddp:
        gathered: list[Any] = [None] * run.dist.world
        torch.distributed.all_gather_object(gathered, rng)
    else:
        gathered = [rng]
    corpus = run.corpus
    return {"model": run.raw_model.state_dict(), "model_config": run.mcfg.to_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "step": run.step,
            "data_position": {"seed": int(run.cfg.seed), "step": run.step}, "rng": gathered,
            "config": to_container(run.cfg), "dataset": run.data_meta,
            "text": ({"tokenizer": corpus.tokenizer, "vocab_size": corpus.vocab_size, "eot": corpus.eot,
                      "cache": str(corpus.path)} if corpus else None),
            "orbit_len": run.orbit_len, "text_len": run.text_len if corpus else None,
            "first_val_loss": run.first, "tokens": run.tokens_seen, "wall_s": run.wall(),
            "world_size": run.dist.world, "code_version": run.version}


def _checkpoint(run: _Run) -> None:
    """Write ``checkpoints/last.pt`` (the previous one kept as ``prev.pt``) once the weights and the optimiser
    state are checked finite; a non-finite state raises :class:`NonFiniteLossError` and writes nothing."""
    state = _state(run)
    weights, optim = nonfinite_tensors(state)
    if weights or optim:
        raise _nonfinite(run, f"{describe_nonfinite(weights, optim)} before writing the checkpoint", applied=True)
    error = None
    if run.is_main:
        try:
            save_checkpoint(run.ckpt_path, state)
        except OSError as e:   # StorageError: path, bytes needed, fix
            error = e
    if run.dist.ddp:   # every rank learns whether rank 0's write worked (instead of waiting at a barrier)
        flag = [str(error) if error else None]
        torch.distributed.broadcast_object_list(flag, src=0)
        if flag[0] and error is None:
            raise RuntimeError(f"rank 0 could not write the checkpoint: {flag[0]}")
    if error is not None:
        raise error
    run.last_good = (run.ckpt_path, run.step)


def _finish(run: _Run, metrics: _Metrics) -> dict:
    """Rank 0 after the last step: final validation, length extrapolation, the dynamics check, and
    ``results.json["pretrain"]`` (numbers only; ``gravprobe.report.draw_figures`` draws the figures)."""
    tc, spec, corpus, device = run.tc, run.spec, run.corpus, run.dist.device
    last = run.evaluate()
    metrics.log(run.step, "val", last, run.scheduler.get_last_lr()[0], run.tokens_seen * run.dist.world,
                run.wall())
    log.info("step %d: val %s", run.step, _fmt(last))
    ex = tc.extrapolation
    extrap = length_extrapolation(
        run.raw_model, factors=list(ex.factors), orbit_len=run.orbit_len,
        text_len=run.text_len if corpus else None, spec=spec, seed=int(run.cfg.seed) + ex.seed_offset,
        n_systems=ex.orbit_systems, text_split=corpus.val if corpus else None, n_windows=ex.text_windows,
        batch_size=ex.batch_size, device=device, bf16=run.bf16)
    dyn = tc.dynamics
    dynamics = None
    if dyn.enabled and "bodies" not in spec.stored_arrays:
        log.warning("dynamics not measured: dataset %s stores no bodies array (data.arrays); the report cannot "
                    "say whether the model beats the kinematic baselines", run.ds_path)
    elif dyn.enabled:
        from .dynamics import evaluate_dynamics

        ds = run.ds
        dynamics = evaluate_dynamics(
            run.raw_model, ds.tokens, getattr(ds, "positions", None) if "positions" in spec.stored_arrays else None,
            ds.bodies if "bodies" in spec.stored_arrays else None, n_bins=int(spec.n_bins),
            coord_range=float(spec.coord_range), train_ids=run.source.train_ids, val_ids=run.source.val_ids,
            context=run.orbit_len, rollout_steps=dyn.rollout_steps, n_val=dyn.n_val, n_fit=dyn.n_fit,
            n_rollout=dyn.n_rollout, batch_size=dyn.batch_size,
            device=device)
        log.info("dynamics: %s", dynamics.get("verdict"))
    summary = {
        "attention": run.mcfg.attention.get("name"), "arm": arm_label(run.mcfg.attention), "steps": run.step,
        "dynamics": dynamics,
        "loss": {k: {"first": run.first.get(k), "last": last[k]} for k in last},
        "length_extrapolation": extrap,
        "model": {"name": select(run.cfg, "model.name"), "params": run.raw_model.num_params(),
                  "params_non_embedding": run.raw_model.num_params(True)},
        "orbit_context": run.orbit_len, "text_context": run.text_len if corpus else None,
        "text_ratio": tc.text_ratio, "tokens": run.tokens_seen * run.dist.world,
        "wall_s": round(run.wall(), 2), "checkpoint": str(run.ckpt_path),
    }
    update_results(run.run_dir, "pretrain", summary)   # figures: gravprobe.report.draw_figures(run_dir)
    return {"checkpoint": str(run.ckpt_path), "steps": run.step, "loss": summary["loss"],
            "length_extrapolation": extrap}


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") \
        else contextlib.nullcontext()


def _fmt(losses: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
