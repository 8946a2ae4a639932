"""The GPT of METHOD.md §3: one pre-norm decoder trunk shared by an orbit and a text modality.

A reader can hold this file in their head (after nanoGPT). The attention layer comes from
:mod:`gravprobe.attention` by name; nothing here computes attention weights.

Orbit modality (METHOD §1.3 tokens, ``V = n_bins``, ids ``V``/``V+1`` = dt markers, ``V+2`` = padding):
- discrete (default): input = embedding(x-bin) + embedding(y-bin) over ``V + 3`` ids each; output = two
  ``V + 3``-way heads giving the x- and y-bin of the *next* token. Loss = mean of the two cross-entropies
  (nats per coordinate), padding targets ignored.
- continuous (regression): input = a linear map of (x, y) / ``position_scale`` (AU), a learned marker
  vector where the input is not a coordinate (NaN: dt marker or padding); output = a 2-d head predicting
  the next (x, y) / ``position_scale``; loss = mean squared error over coordinate targets. Optional
  Gaussian noise ``context_noise`` (model units) is added to the context positions during training.

Text modality: token embedding in, tied language-model head out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from gravprobe.attention import CausalSelfAttention
from torch import nn

POSITIONS = ("rope", "learned")
ORBIT_MODES = ("discrete", "continuous")
ACTIVATIONS = ("gelu", "silu")
ORBIT_TARGETS = ("all", "last")


class SequenceTooLongError(ValueError):
    """A sequence is longer than a learned-position model's context."""


@dataclass
class GPTConfig:
    """Model hyper-parameters; derived sizes are properties. ``orbit_vocab``/``text_vocab`` = 0 drop a modality."""

    n_layers: int = 2
    n_heads: int = 2
    d_model: int = 64
    block_size: int = 256          # training context in tokens; a hard limit only for learned positions
    position: str = "rope"         # rope | learned
    rope_base: float = 10000.0
    mlp_ratio: int = 4
    activation: str = "gelu"       # MLP non-linearity: gelu (GPT-2) | silu (Liu et al.'s small regression model)
    dropout: float = 0.0
    bias: bool = False
    orbit_vocab: int = 0           # V + 3 (bins + two dt markers + padding)
    orbit_mode: str = "discrete"   # discrete | continuous
    position_scale: float = 10.0   # AU per model unit (continuous mode)
    context_noise: float = 0.0     # sigma of Gaussian noise on context positions in training (model units)
    text_vocab: int = 0
    attention: dict = field(default_factory=lambda: {"name": "softmax", "params": {}, "backend": "auto"})

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"unknown model.position={self.position!r}; choose one of {POSITIONS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown model.activation={self.activation!r}; choose one of {ACTIVATIONS}")
        if self.orbit_mode not in ORBIT_MODES:
            raise ValueError(f"unknown model.orbit_mode={self.orbit_mode!r}; choose one of {ORBIT_MODES}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.orbit_vocab == 0 and self.text_vocab == 0:
            raise ValueError("the model needs at least one modality (orbit_vocab or text_vocab > 0)")
        if self.orbit_mode == "discrete" and 0 < self.orbit_vocab < 4:
            raise ValueError(f"orbit_vocab={self.orbit_vocab} must be n_bins + 3 (>= 4)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_hidden(self) -> int:
        return self.mlp_ratio * self.d_model

    @property
    def orbit_pad(self) -> int:
        return self.orbit_vocab - 1

    def to_dict(self) -> dict:
        return asdict(self)


class _WeightedCrossEntropy(torch.autograd.Function):
    """``sum_i w_i (logsumexp_j l_ij - l_i,t_i)`` for logits ``[M, V]``, targets ``[M]`` and row weights ``[M]``
    (0 for ignored rows, whose target may be any id). With ``w_i = 1 / (number of unignored rows)`` this is
    ``F.cross_entropy(l, t, ignore_index=...)``, to rounding. Faster than
    ``log_softmax`` + ``nll_loss`` on the CPU: the forward writes no ``[M, V]`` log-probabilities to keep and
    the backward is one pass, ``(exp(l - logsumexp l) - onehot(t)) w g``."""

    @staticmethod
    def forward(ctx, logits, target, weight):
        lse = torch.logsumexp(logits, -1)
        t = torch.where(weight == 0, 0, target)[:, None]
        ctx.save_for_backward(logits, lse, t, weight)
        picked = logits.gather(1, t)[:, 0]
        return torch.where(weight != 0, (lse - picked) * weight, 0.0).sum()

    @staticmethod
    def backward(ctx, g):
        logits, lse, t, weight = ctx.saved_tensors
        w = torch.where(weight != 0, weight * g, 0.0)[:, None]
        grad = torch.sub(logits, lse[:, None]).exp_()
        grad.scatter_add_(1, t, torch.full_like(w, -1.0))
        return grad.mul_(w), None, None


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.act = F.silu if cfg.activation == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention.from_config(cfg.attention, cfg.d_model, cfg.n_heads,
                                                    rope=cfg.position == "rope", rope_base=cfg.rope_base,
                                                    bias=cfg.bias)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer with orbit and text inputs/outputs on one trunk.

    Public surface used by the probes: :meth:`hidden_states`, :meth:`encode`, ``d_model``, ``n_layers``.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.d_model
        if cfg.orbit_vocab:
            if cfg.orbit_mode == "discrete":
                self.orbit_emb_x = nn.Embedding(cfg.orbit_vocab, C)
                self.orbit_emb_y = nn.Embedding(cfg.orbit_vocab, C)
                self.orbit_head_x = nn.Linear(C, cfg.orbit_vocab, bias=False)
                self.orbit_head_y = nn.Linear(C, cfg.orbit_vocab, bias=False)
            else:
                self.orbit_in = nn.Linear(2, C, bias=True)
                self.orbit_marker = nn.Parameter(torch.zeros(C))
                self.orbit_out = nn.Linear(C, 2, bias=True)
        if cfg.text_vocab:
            self.text_emb = nn.Embedding(cfg.text_vocab, C)
        self.pos_emb = nn.Embedding(cfg.block_size, C) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(C, bias=cfg.bias)
        self.apply(self._init_weights)
        # GPT-2: residual output projections scaled by 1/sqrt(2 L)
        for name, p in self.named_parameters():
            if name.endswith(("mlp.proj.weight", "attn.out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------ properties
    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the vocabulary-sized input embeddings and output heads
        and the learned positions (i.e. counts the trunk). The tied text head counts once."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for name in ("text_emb", "orbit_emb_x", "orbit_emb_y", "orbit_head_x", "orbit_head_y", "pos_emb"):
                m = getattr(self, name, None)
                if m is not None:
                    n -= m.weight.numel()
        return n

    # ---------------------------------------------------------------------------------------- inputs
    def _check_length(self, T: int) -> None:
        if self.pos_emb is not None and T > self.cfg.block_size:
            raise SequenceTooLongError(
                f"sequence of {T} tokens is longer than this learned-position model's context "
                f"({self.cfg.block_size}); use model.position=rope to run at any length, or shorter sequences")

    def embed_orbits(self, x: torch.Tensor) -> torch.Tensor:
        """Orbit input ``[B, T, 2]`` -> ``[B, T, C]``.

        Discrete mode: integer bin ids (x-bin, y-bin) in ``[0, V + 3)``. Continuous mode: float positions
        in AU, NaN where the step is a dt marker or padding (replaced by a learned marker vector).
        """
        if not self.cfg.orbit_vocab:
            raise RuntimeError("this model has no orbit modality (orbit_vocab=0)")
        if x.ndim != 3 or x.shape[-1] != 2:
            raise ValueError(f"orbit input must be [B, T, 2], got {tuple(x.shape)}")
        if self.cfg.orbit_mode == "discrete":
            if x.is_floating_point():
                raise TypeError("a discrete-mode model takes integer orbit tokens [B, T, 2]")
            return self.orbit_emb_x(x[..., 0]) + self.orbit_emb_y(x[..., 1])
        x = x.float()
        coord = torch.isfinite(x).all(-1, keepdim=True)                        # [B, T, 1]
        pos = torch.where(coord, x, torch.zeros_like(x)) / self.cfg.position_scale
        if self.training and self.cfg.context_noise > 0:
            pos = pos + self.cfg.context_noise * torch.randn_like(pos)
        return torch.where(coord, self.orbit_in(pos), self.orbit_marker.to(pos.dtype))

    def embed_text(self, idx: torch.Tensor) -> torch.Tensor:
        """Text ids ``[B, T]`` -> ``[B, T, C]``."""
        if not self.cfg.text_vocab:
            raise RuntimeError("this model has no text modality (text_vocab=0)")
        return self.text_emb(idx)

    # ----------------------------------------------------------------------------------------- trunk
    def trunk(self, h: torch.Tensor, all_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Run the blocks on embeddings ``[B, T, C]``; final-normed ``[B, T, C]`` or, with ``all_layers``,
        the list ``[embeddings (+ positions), after block 1, ..., after block L]`` (un-normed)."""
        T = h.shape[1]
        self._check_length(T)
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(T, device=h.device))
        h = self.drop(h)
        states = [h]
        for block in self.blocks:
            h = block(h)
            if all_layers:
                states.append(h)
        return states if all_layers else self.ln_f(h)

    def hidden_states(self, orbit_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Orbit input ``[B, T, 2]`` -> ``n_layers + 1`` tensors ``[B, T, C]``: index 0 = embeddings,
        index i = the residual stream after block i (before the final norm)."""
        return self.trunk(self.embed_orbits(orbit_tokens), all_layers=True)

    def encode(self, orbit_tokens: torch.Tensor) -> torch.Tensor:
        """Orbit input ``[B, T, 2]`` -> final normed hidden state ``[B, T, C]`` (what the heads read)."""
        return self.trunk(self.embed_orbits(orbit_tokens))

    # ------------------------------------------------------------------------------- heads and losses
    def orbit_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """Normed hidden ``[B, T, C]`` -> next-token logits ``([B, T, V+3], [B, T, V+3])`` (discrete) or the
        next position ``[B, T, 2]`` in AU (continuous)."""
        if self.cfg.orbit_mode == "discrete":
            return self.orbit_head_x(h), self.orbit_head_y(h)
        return self.orbit_out(h) * self.cfg.position_scale

    def forward_orbits(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """Orbit input ``[B, T, 2]`` and optional next-step targets ``[B, T, 2]`` (same kind as the input)
        -> ``(outputs, loss)``; ``loss`` is ``None`` without targets (see :meth:`orbit_outputs`)."""
        out = self.orbit_outputs(self.encode(x))
        if targets is None:
            return out, None
        if self.cfg.orbit_mode == "discrete":
            # = 0.5 (F.cross_entropy(lx, tx, ignore_index=pad) + same for y), via the one-pass-backward Function
            losses = []
            for logits, tgt in zip(out, targets.unbind(-1)):
                logits, tgt = logits.flatten(0, 1).float(), tgt.flatten()
                valid = tgt != self.cfg.orbit_pad
                weight = valid.to(logits.dtype) / valid.sum()                     # NaN when nothing is scored
                losses.append(_WeightedCrossEntropy.apply(logits, tgt, weight))
            return out, 0.5 * (losses[0] + losses[1])
        valid = torch.isfinite(targets).all(-1)                                  # [B, T]
        scale = self.cfg.position_scale
        err = (out.float() - torch.nan_to_num(targets.float())) / scale
        loss = (err.pow(2).sum(-1) * valid).sum() / (2 * valid.sum().clamp(min=1))
        return out, loss

    def forward_text(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Text ids ``[B, T]`` and optional next-token targets ``[B, T]`` -> ``(logits [B, T, V_text], loss)``."""
        h = self.trunk(self.embed_text(idx))
        logits = F.linear(h, self.text_emb.weight)                              # tied head
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def orbit_targets(self, orbits: torch.Tensor, which: str = "all") -> torch.Tensor:
        """Next-step targets ``[B, T, 2]`` of full sequences ``orbits [B, T+1, 2]``. ``which="last"`` keeps only
        each sequence's last scored target (the others become padding / NaN, i.e. unscored)."""
        if which not in ORBIT_TARGETS:
            raise ValueError(f"unknown orbit targets {which!r} (train.orbit_loss); choose one of {ORBIT_TARGETS}")
        tgt = orbits[:, 1:]
        if which == "all":
            return tgt
        if self.cfg.orbit_mode == "discrete":
            valid = tgt[..., 0] != self.cfg.orbit_pad
            blank = torch.full_like(tgt, self.cfg.orbit_pad)
        else:
            valid = torch.isfinite(tgt).all(-1)
            blank = torch.full_like(tgt, float("nan"))
        T = tgt.shape[1]
        idx = torch.arange(T, device=tgt.device).expand_as(valid)
        last = torch.where(valid, idx, -1).amax(1, keepdim=True)                 # [B, 1]
        keep = (idx == last) & valid
        return torch.where(keep[..., None], tgt, blank)

    def forward(self, orbits: torch.Tensor | None = None, text: torch.Tensor | None = None,
                orbit_targets: str = "all") -> dict[str, Any]:
        """Training convenience: full sequences ``orbits [B, T+1, 2]`` / ``text [B, T+1]``; each is split into
        input ``[:, :-1]`` and target ``[:, 1:]`` (``orbit_targets="last"``: only the last orbit target is
        scored, Liu et al.'s option). Returns ``{modality: loss}`` for the modalities given."""
        losses: dict[str, Any] = {}
        if orbits is not None and orbits.shape[0]:
            losses["orbits"] = self.forward_orbits(orbits[:, :-1], self.orbit_targets(orbits, orbit_targets))[1]
        if text is not None and text.shape[0]:
            losses["text"] = self.forward_text(text[:, :-1], text[:, 1:])[1]
        return losses
