"""The GPT of METHOD.md §3 and its mixed orbit + language pretraining (issue 4).

Public API:
    GPT, GPTConfig                          — the model (``hidden_states``, ``encode``, ``d_model``, ``n_layers``)
    load_checkpoint(path, map_location)     — ``(model, meta)`` from a verified ``run_dir/checkpoints/last.pt``
    save_checkpoint, read_checkpoint, verify_checkpoint, CheckpointError — checksummed checkpoints
    load_text_corpus(cfg.text, home)        — tokenised, memory-mapped language data
    train.main(cfg, run_dir)                — the ``gravprobe pretrain`` stage
"""
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint, verify_checkpoint
from .evaluate import length_extrapolation
from .model import GPT, GPTConfig, SequenceTooLongError
from .text import ByteTokenizer, TextDataError, get_tokenizer, load_text_corpus
from .train import NonFiniteLossError

__all__ = [
    "GPT",
    "ByteTokenizer",
    "CheckpointError",
    "GPTConfig",
    "NonFiniteLossError",
    "SequenceTooLongError",
    "TextDataError",
    "get_tokenizer",
    "length_extrapolation",
    "load_checkpoint",
    "load_text_corpus",
    "read_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
