"""`gravprobe pretrain`: mixed orbit + text pretraining of the GPT, checkpoints/resume, DDP, evaluation.

``main(cfg, run_dir)`` (called by the CLI with the composed Hydra config):

1. ensures the orbit dataset of ``cfg.data`` (``gravprobe.orbits.ensure_dataset`` under
   ``dataset_dir(spec, cfg.seed)``, or the existing folder ``cfg.train.dataset``) and, when
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gravprobe.common import arm_label, code_version, output_root, update_results

from .data import DatasetMismatchError, MixedBatches, OrbitSource
from .evaluate import length_extrapolation, mean_loss, n_targets
from .model import GPT, ORBIT_TARGETS, GPTConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
METRIC_FIELDS = ["step", "split", "modality", "loss", "lr", "tokens", "wall_s"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------- helpers
def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    if isinstance(node, Mapping):
        return node.get(key, default)
    try:
        return node.get(key, default)
    except AttributeError:
        return getattr(node, key, default)


def _container(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, (DictConfig, ListConfig)):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return node


def _home(cfg: Any) -> Path:
    home = _get(cfg, "home")
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
    """AdamW with weight decay on matrices/embeddings (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    betas = tuple(float(b) for b in _get(tc, "betas", (0.9, 0.95)))
    return torch.optim.AdamW([{"params": decay, "weight_decay": float(_get(tc, "weight_decay", 0.1))},
                              {"params": no_decay, "weight_decay": 0.0}], lr=float(_get(tc, "lr", 6e-4)),
                             betas=betas)


def model_config(cfg: Any, orbit_vocab: int, text_vocab: int) -> GPTConfig:
    """``GPTConfig`` from ``cfg.model`` and ``cfg.attention`` plus the data-derived vocabularies."""
    m = _container(cfg.model)
    fields = {k: v for k, v in m.items() if k != "name"}
    unknown = sorted(set(fields) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid: {sorted(GPTConfig.__dataclass_fields__)}")
    return GPTConfig(**fields, orbit_vocab=orbit_vocab, text_vocab=text_vocab,
                     attention=_container(cfg.attention))


# ------------------------------------------------------------------------------------------ checkpoints
def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then ``os.replace``: a reader sees the old
    checkpoint or the complete new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Rebuild the trained model from a checkpoint -> ``(model in eval mode, meta)``.

    ``meta`` holds everything but the weights and optimiser state: ``model_config``, ``config`` (the
    resolved run config), ``step``, ``dataset`` (path, spec, n_bins), ``text`` (tokenizer, vocab), ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; run `gravprobe pretrain` first or pass checkpoint=PATH")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gravprobe pretrain checkpoint (format {ckpt.get('format')!r})")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(map_location if not isinstance(map_location, dict) else "cpu").eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    return model, meta


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


# ------------------------------------------------------------------------------------------------- main
def _ensure_orbits(cfg: Any, dist: _Dist):
    from gravprobe.orbits import DatasetSpec, dataset_dir, ensure_dataset, load_dataset

    spec = DatasetSpec.from_config(cfg.data)
    explicit = _get(cfg.train, "dataset")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "manifest.json").is_file():
            raise DatasetMismatchError(f"train.dataset={path} holds no orbit dataset (no manifest.json); run "
                                       f"`gravprobe generate out={path}` or set train.dataset=null")
    else:
        path = dataset_dir(spec, cfg.seed)
        if dist.rank == 0:
            ensure_dataset(spec, path, seed=cfg.seed, workers=int(_get(cfg, "workers", 0) or 0))
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
    tc = cfg.train
    dist = _Dist(str(_get(cfg, "device", "auto")))
    if dist.ddp:  # Hydra's timestamped run folder can differ between processes by a second: use rank 0's
        shared = [str(run_dir)]
        torch.distributed.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    try:
        return _train(cfg, tc, run_dir, dist)
    finally:
        dist.close()


def _train(cfg: Any, tc: Any, run_dir: Path, dist: _Dist) -> dict:
    from gravprobe.common import progress

    is_main = dist.rank == 0
    seed = int(cfg.seed)
    device = dist.device
    precision = str(_get(tc, "precision", "auto"))
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision={precision!r}; choose auto, bf16 or fp32")
    bf16 = device.type == "cuda" and precision in ("auto", "bf16")
    if str(_get(tc, "orbit_loss", "all")) not in ORBIT_TARGETS:
        raise ValueError(f"train.orbit_loss={_get(tc, 'orbit_loss')!r}; choose one of {ORBIT_TARGETS}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # ---- data
    spec, ds_path, ds, n_bins = _ensure_orbits(cfg, dist)
    text_ratio = float(_get(tc, "text_ratio", 0.0))
    corpus = None
    if text_ratio > 0:
        from .text import load_text_corpus

        if is_main:
            corpus = load_text_corpus(cfg.text, _home(cfg))
        dist.barrier()
        if not is_main:
            corpus = load_text_corpus(cfg.text, _home(cfg), rank=dist.rank)
    mcfg = model_config(cfg, orbit_vocab=n_bins + 3, text_vocab=corpus.vocab_size if corpus else 0)
    seq_len = _get(tc, "seq_len")
    orbit_len = int(seq_len) if seq_len else min(int(ds.tokens.shape[1]) - 1, mcfg.block_size)
    text_len = int(_get(tc, "text_seq_len") or orbit_len)
    if mcfg.position == "learned" and max(orbit_len, text_len) > mcfg.block_size:
        from .model import SequenceTooLongError

        raise SequenceTooLongError(f"training context {max(orbit_len, text_len)} exceeds the learned-position "
                                   f"model.block_size={mcfg.block_size}; raise model.block_size or lower train.seq_len")
    source = OrbitSource(ds.tokens, getattr(ds, "positions", None), n_bins,
                         float(_get(tc, "val_fraction", 0.05)), mcfg.orbit_mode)
    batches = MixedBatches(source, corpus.train if corpus else None, batch_size=int(tc.batch_size),
                           text_ratio=text_ratio, orbit_len=orbit_len, text_len=text_len, seed=seed,
                           text_val=corpus.val if corpus else None)
    if text_ratio > 0 and batches.n_text == 0:
        log.warning("train.text_ratio=%g of train.batch_size=%d rounds to 0 text sequences per batch; no text "
                    "is trained (raise one of them)", text_ratio, int(tc.batch_size))
    accum = int(_get(tc, "grad_accum", 1))
    batches.micro_batches(0, dist.rank, dist.world, accum)  # validates divisibility early

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
    steps = int(tc.steps)
    optimizer = make_optimizer(model, tc)
    warmup, min_ratio = int(_get(tc, "warmup_steps", 0)), float(_get(tc, "min_lr_ratio", 0.1))
    schedule, drop_at = str(_get(tc, "schedule", "cosine")), float(_get(tc, "lr_drop_at", 0.5))
    lr_factor(0, warmup, steps, min_ratio, schedule, drop_at)  # validates the schedule name before any work
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, steps, min_ratio, schedule, drop_at))

    # ---- resume
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    resume = _get(tc, "resume", "auto")
    resume_from: Path | None = None
    if isinstance(resume, str) and resume not in ("auto", "true", "false", "True", "False"):
        resume_from = Path(resume).expanduser()
        if not resume_from.is_file():
            raise FileNotFoundError(f"train.resume={resume_from} does not exist")
    elif resume in (True, "true", "True"):
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"train.resume=true but {ckpt_path} does not exist")
        resume_from = ckpt_path
    elif resume == "auto" and ckpt_path.is_file():
        resume_from = ckpt_path
    step, first = 0, {}
    tokens_seen, wall_before = 0, 0.0
    data_meta = {"path": str(ds_path), "spec": spec.to_dict(), "spec_hash": spec.spec_hash(), "n_bins": n_bins,
                 "seed": seed, "seq_len": int(ds.tokens.shape[1])}
    if resume_from is not None:
        ckpt = torch.load(resume_from, map_location="cpu", weights_only=False)
        if ckpt.get("model_config") != mcfg.to_dict():
            diff = {k: (ckpt.get("model_config", {}).get(k), v) for k, v in mcfg.to_dict().items()
                    if ckpt.get("model_config", {}).get(k) != v}
            raise ValueError(f"cannot resume {resume_from}: model config differs (checkpoint, now): {diff}")
        if ckpt["dataset"]["spec_hash"] != data_meta["spec_hash"] or ckpt["dataset"]["seed"] != seed:
            raise DatasetMismatchError(f"cannot resume {resume_from}: it was trained on dataset "
                                       f"{ckpt['dataset']['path']} (spec {ckpt['dataset']['spec_hash'][:8]}, "
                                       f"seed {ckpt['dataset']['seed']}), the config now names {ds_path}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, first = int(ckpt["step"]), dict(ckpt.get("first_val_loss", {}))
        tokens_seen, wall_before = int(ckpt.get("tokens", 0)), float(ckpt.get("wall_s", 0.0))
        rngs = ckpt.get("rng") or []
        if rngs:
            _set_rng_state(rngs[dist.rank] if dist.rank < len(rngs) else rngs[0])
        if is_main:
            log.info("resumed from %s at step %d", resume_from, step)
    raw_model = model
    if dist.ddp:
        # broadcast_buffers=False: the only buffers are RoPE cos/sin caches that each process grows on demand
        # (rank 0 evaluates alone, so their sizes differ); find_unused_parameters: a process's micro-batch
        # may hold no sequence of one modality.
        import inspect

        no_sync_buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(nn.parallel.DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=corpus is not None, **no_sync_buffers)

    metrics = _Metrics(run_dir, is_main, step if resume_from is not None else None)
    eval_batches = int(_get(tc, "eval_batches", 4))
    orbit_loss = str(_get(tc, "orbit_loss", "all"))
    val_orbits = batches.val_orbit_batches(eval_batches, max(1, int(tc.batch_size) - batches.n_text))
    val_text = batches.val_text_batches(eval_batches, max(1, batches.n_text))

    def evaluate() -> dict[str, float]:
        res = {"orbits": mean_loss(raw_model, val_orbits, "orbits", device, bf16, orbit_loss)}
        if val_text:
            res["text"] = mean_loss(raw_model, val_text, "text", device, bf16)
        return res

    def state(step_: int) -> dict:
        rng = _rng_state()
        if dist.ddp:
            gathered: list[Any] = [None] * dist.world
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {"format": CHECKPOINT_FORMAT, "model": raw_model.state_dict(), "model_config": mcfg.to_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step_,
                "data_position": {"seed": seed, "step": step_}, "rng": gathered,
                "config": _container(cfg), "dataset": data_meta,
                "text": ({"tokenizer": corpus.tokenizer, "vocab_size": corpus.vocab_size, "eot": corpus.eot,
                          "cache": str(corpus.path)} if corpus else None),
                "orbit_len": orbit_len, "text_len": text_len if corpus else None,
                "first_val_loss": first, "tokens": tokens_seen, "wall_s": wall_before + time.time() - t0,
                "world_size": dist.world, "code_version": code_version()}

    def checkpoint(step_: int) -> None:
        s = state(step_)   # every rank joins the RNG gather
        if is_main:
            save_checkpoint(ckpt_path, s)
        dist.barrier()

    t0 = time.time()
    if step == 0 and is_main:
        first = evaluate()
        metrics.log(0, "val", first, scheduler.get_last_lr()[0], 0, 0.0)
        log.info("step 0: val %s", _fmt(first))
    stop_at = _get(tc, "stop_at")
    stop = min(steps, int(stop_at)) if stop_at is not None else steps
    eval_every, ckpt_every = int(_get(tc, "eval_every", 0) or 0), int(_get(tc, "ckpt_every", 0) or 0)
    log_every = max(1, int(_get(tc, "log_every", 10) or 1))
    clip = float(_get(tc, "grad_clip", 0.0) or 0.0)
    last_good = step if resume_from is not None else None
    model.train()
    bar = progress(total=stop, initial=step, desc=f"pretrain {mcfg.attention.get('name')}", disable=not is_main,
               dynamic_ncols=True)
    # The step's objective: per modality the mean loss over all its target tokens in the global batch,
    # weighted by the modality's share of sequences. Token counts are summed over micro-batches and ranks
    # first, so grad_accum and DDP give the gradient of exactly this objective.
    B = int(tc.batch_size)
    sums = torch.zeros(4, dtype=torch.float64)   # orbit loss*tokens, orbit tokens, text loss*tokens, text tokens
    while step < stop:
        lr = scheduler.get_last_lr()[0]
        micro = batches.micro_batches(step, dist.rank, dist.world, accum)
        optimizer.zero_grad(set_to_none=True)
        n_tok = [(n_targets(raw_model, mb.orbits, "orbits", orbit_loss), n_targets(raw_model, mb.text, "text"))
                 for mb in micro]
        counts = torch.tensor([sum(c[0] for c in n_tok), sum(c[1] for c in n_tok)], dtype=torch.float64)
        if dist.ddp:
            torch.distributed.all_reduce(counts)
        weight = {"orbits": (B - batches.n_text) / B / max(float(counts[0]), 1.0),
                  "text": batches.n_text / B / max(float(counts[1]), 1.0)}
        local = torch.zeros(4, dtype=torch.float64)
        for i, (mb, (no, nt)) in enumerate(zip(micro, n_tok)):
            o = torch.from_numpy(mb.orbits).to(device)
            t = torch.from_numpy(mb.text).to(device)
            sync = contextlib.nullcontext() if (not dist.ddp or i == len(micro) - 1) else model.no_sync()
            with sync:
                with _autocast(device, bf16):
                    losses = model(orbits=o if no else o[:0], text=t if nt else t[:0], orbit_targets=orbit_loss)
                n = {"orbits": no, "text": nt}
                loss = sum(losses[k] * (n[k] * weight[k] * dist.world) for k in losses)
                loss.backward()
            if "orbits" in losses:
                local[0] += float(losses["orbits"].detach()) * no
                local[1] += no
            if "text" in losses:
                local[2] += float(losses["text"].detach()) * nt
                local[3] += nt
            tokens_seen += (mb.orbits.shape[1] - 1) * len(o) + (mb.text.shape[1] - 1) * len(t)
        if dist.ddp:
            torch.distributed.all_reduce(local)
        step_losses = {}
        if local[1] > 0:
            step_losses["orbits"] = float(local[0] / local[1])
        if local[3] > 0:
            step_losses["text"] = float(local[2] / local[3])
        bad = [k for k, v in step_losses.items() if not math.isfinite(v)]
        if bad:
            where = (f"the last good checkpoint is {ckpt_path} (step {last_good})" if last_good is not None
                     else "no checkpoint was written yet")
            raise NonFiniteLossError(f"non-finite {'/'.join(bad)} training loss at step {step + 1} "
                                     f"({_fmt(step_losses)}); training stopped, {where}. Lower train.lr, keep "
                                     "train.grad_clip on, or check the data")
        if clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        step += 1
        sums += local
        bar.update(1)
        if step % log_every == 0 or step == stop:
            avg = {}
            if sums[1] > 0:
                avg["orbits"] = float(sums[0] / sums[1])
            if sums[3] > 0:
                avg["text"] = float(sums[2] / sums[3])
            metrics.log(step, "train", avg, lr, tokens_seen * dist.world, wall_before + time.time() - t0)
            bar.set_postfix({k: f"{v:.3f}" for k, v in avg.items()})
            sums.zero_()
        if eval_every and step % eval_every == 0 and step != stop and is_main:
            val = evaluate()
            metrics.log(step, "val", val, lr, tokens_seen * dist.world, wall_before + time.time() - t0)
            log.info("step %d: val %s", step, _fmt(val))
        if (ckpt_every and step % ckpt_every == 0) or step == stop:
            checkpoint(step)
            last_good = step
    bar.close()
    if stop < steps:
        metrics.close()
        if is_main:
            log.info("stopped at step %d of %d (train.stop_at); resume with the same run folder", stop, steps)
        return {"checkpoint": str(ckpt_path), "steps": step, "stopped": True}
    if not is_main:
        metrics.close()
        return {"checkpoint": str(ckpt_path), "steps": step}

    # ---- final evaluation, length extrapolation, results (rank 0)
    last = evaluate()
    metrics.log(step, "val", last, scheduler.get_last_lr()[0], tokens_seen * dist.world,
                wall_before + time.time() - t0)
    metrics.close()
    log.info("step %d: val %s", step, _fmt(last))
    ex = _get(tc, "extrapolation", {}) or {}
    extrap = length_extrapolation(
        raw_model, factors=list(_get(ex, "factors", [1, 2, 4, 8, 16]) or []), orbit_len=orbit_len,
        text_len=text_len if corpus else None, spec=spec, seed=seed + int(_get(ex, "seed_offset", 1000003)),
        n_systems=int(_get(ex, "orbit_systems", 16)), text_split=corpus.val if corpus else None,
        n_windows=int(_get(ex, "text_windows", 16)), batch_size=int(_get(ex, "batch_size", 4)), device=device,
        bf16=bf16)
    dyn_cfg = _get(tc, "dynamics", {}) or {}
    dynamics = None
    if _get(dyn_cfg, "enabled", True) and "bodies" not in spec.stored_arrays:
        log.warning("dynamics not measured: dataset %s stores no bodies array (data.arrays); the report cannot "
                    "say whether the model beats the kinematic baselines", ds_path)
    elif _get(dyn_cfg, "enabled", True):
        from .dynamics import evaluate_dynamics

        dynamics = evaluate_dynamics(
            raw_model, ds.tokens, getattr(ds, "positions", None) if "positions" in spec.stored_arrays else None,
            ds.bodies if "bodies" in spec.stored_arrays else None, n_bins=n_bins,
            coord_range=float(spec.coord_range), train_ids=source.train_ids, val_ids=source.val_ids,
            context=orbit_len, rollout_steps=int(_get(dyn_cfg, "rollout_steps", 20)),
            n_val=_get(dyn_cfg, "n_val", 256), n_fit=_get(dyn_cfg, "n_fit", 2048),
            n_rollout=_get(dyn_cfg, "n_rollout", 32), batch_size=int(_get(dyn_cfg, "batch_size", 32)),
            device=device)
        log.info("dynamics: %s", dynamics.get("verdict"))
    summary = {
        "attention": mcfg.attention.get("name"), "arm": arm_label(mcfg.attention), "steps": step,
        "dynamics": dynamics,
        "loss": {k: {"first": first.get(k), "last": last[k]} for k in last},
        "length_extrapolation": extrap,
        "model": {"name": _get(cfg.model, "name"), "params": raw_model.num_params(),
                  "params_non_embedding": raw_model.num_params(True)},
        "orbit_context": orbit_len, "text_context": text_len if corpus else None,
        "text_ratio": text_ratio, "tokens": tokens_seen * dist.world,
        "wall_s": round(wall_before + time.time() - t0, 2), "checkpoint": str(ckpt_path),
    }
    update_results(run_dir, "pretrain", summary)   # figures: gravprobe.report.draw_figures(run_dir)
    return {"checkpoint": str(ckpt_path), "steps": step, "loss": summary["loss"], "length_extrapolation": extrap}


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") \
        else contextlib.nullcontext()


def _fmt(losses: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
