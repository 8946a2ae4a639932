"""Language data for mixed pretraining: corpora, tokenizers and memory-mapped token shards.

Three sources (``cfg.text.source``):

- ``stdlib`` (default, offline): English prose every Python installation carries — the documentation
  topics of ``pydoc_data.topics`` plus the docstrings of the standard library's modules, classes and
  functions, read with :mod:`ast` from the ``.py`` sources (nothing is imported, so modules with side
  effects such as ``antigravity`` or GUI packages never run). Order is deterministic (sorted topics,
  sorted file paths, AST order). Never touches the network.
- ``files``: local text files and/or folders (``cfg.text.paths``; folders are searched recursively for
  ``cfg.text.suffixes``), one document per file, sorted by path.
- ``hf``: a Hugging Face ``datasets`` streaming source (e.g. FineWeb-Edu sample); optional extra
  ``pip install 'gravprobe[text]'``, needs network access (or a local HF cache).

Tokenizers: ``byte`` (UTF-8 bytes 0..255 plus ``<|endoftext|>`` = 256; offline default) and ``tiktoken``
(GPT-2 BPE, imported lazily; needs the ``tiktoken`` package and its BPE file, downloaded once into
``TIKTOKEN_CACHE_DIR``). Documents are split into train/validation by a deterministic hash of their
position, tokenised, joined with ``<|endoftext|>`` and written once as ``uint16``/``uint32`` ``.npy``
shards under ``<home>/cache/text/<hash>/{train,val}_NNN.npy`` (with ``manifest.json``); later runs
memory-map them. Sampling loads only the windows of a batch.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gravprobe.common import atomic_write_json
from gravprobe.config import TextConfig

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the shard layout or the corpus extraction changes
SOURCES = ("stdlib", "files", "hf")
TOKENIZERS = ("byte", "tiktoken")

# Standard-library folders that are tests, GUIs, bundled wheels or third-party code, not documentation.
_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "tkinter", "turtledemo", "__pycache__",
    "ensurepip", "lib2to3", "venv", "__phello__",
})
_MIN_DOC_CHARS = 40


class TextDataError(RuntimeError):
    """A text source, tokenizer or cache cannot be used as configured."""


# ----------------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and ``<|endoftext|>`` = 256 (vocabulary 257). Works offline."""

    name = "byte"

    def __init__(self) -> None:
        self.eot = 256
        self.vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """GPT-2 BPE via ``tiktoken`` (vocabulary 50257, ``<|endoftext|>`` = 50256)."""

    name = "tiktoken"

    def __init__(self, encoding: str = "gpt2") -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise TextDataError(
                "text.tokenizer=tiktoken needs the 'tiktoken' package: pip install 'gravprobe[text]' "
                "(or use text.tokenizer=byte, which works offline)") from e
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # tiktoken raises plain exceptions when the BPE file cannot be fetched
            raise TextDataError(
                f"tiktoken could not load the {encoding!r} BPE file ({type(e).__name__}: {e}). It is downloaded "
                "once and cached in $TIKTOKEN_CACHE_DIR; on an offline machine copy the cache there, or use "
                "text.tokenizer=byte") from e
        self.encoding = encoding
        self.eot = self._enc.eot_token
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))


def get_tokenizer(name: str, encoding: str = "gpt2"):
    """``byte`` or ``tiktoken``; unknown names raise a ``ValueError`` listing the choices."""
    if name == "byte":
        return ByteTokenizer()
    if name == "tiktoken":
        return TiktokenTokenizer(encoding)
    raise ValueError(f"unknown text.tokenizer={name!r}; choose one of {TOKENIZERS}")


# -------------------------------------------------------------------------------------------- corpora
def stdlib_documents() -> Iterator[str]:
    """English documentation shipped with Python, in a fixed order; no module is imported or run.

    Yields the ``pydoc_data.topics`` entries (sorted by topic) and then every module/class/function
    docstring of at least 40 characters from the standard library's ``.py`` files (sorted paths).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; the docstrings still carry the corpus
        topics = {}
        log.warning("pydoc_data.topics is not installed; the stdlib corpus uses docstrings only")
    for key in sorted(topics):
        yield topics[key].strip()
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-")))
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, fname).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue  # e.g. lib2to3 test data, bad encodings: not documentation
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=True)
                    if doc and len(doc) >= _MIN_DOC_CHARS:
                        yield doc


def file_documents(paths: Iterable[str | os.PathLike], suffixes: Iterable[str] = (".txt", ".md", ".rst")
                   ) -> Iterator[str]:
    """One document per file; folders are searched recursively for ``suffixes``; sorted by path."""
    suffixes = tuple(suffixes)
    for path in _expand_files(paths, suffixes):
        yield path.read_text(encoding="utf-8", errors="replace")


def _expand_files(paths: Iterable[str | os.PathLike], suffixes: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    paths = list(paths or [])
    if not paths:
        raise TextDataError("text.source=files needs text.paths=[file_or_folder, ...]")
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in suffixes)
            if not found:
                raise TextDataError(f"text folder {p} holds no files ending in {suffixes}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TextDataError(f"text path {p} does not exist (text.paths)")
    return files


def hf_documents(path: str, name: str | None, split: str, text_field: str, max_documents: int | None
                 ) -> Iterator[str]:
    """Stream documents from a Hugging Face dataset (``datasets`` extra; needs network or a local cache)."""
    try:
        import datasets
    except ImportError as e:
        raise TextDataError("text.source=hf needs the 'datasets' package: pip install 'gravprobe[text]'") from e
    ds = datasets.load_dataset(path, name=name, split=split, streaming=True)
    for i, row in enumerate(ds):
        if max_documents is not None and i >= max_documents:
            break
        yield row[text_field]


def text_config(text_cfg: Any) -> TextConfig:
    """``cfg.text`` (an OmegaConf node, a dict — missing keys from ``conf/text/stdlib.yaml`` — or a
    :class:`~gravprobe.config.TextConfig`) as the typed, validated section; raises ``ConfigError``."""
    return text_cfg if isinstance(text_cfg, TextConfig) else TextConfig.from_cfg(text_cfg)


def documents(text_cfg: Any) -> Iterator[str]:
    """The documents of ``cfg.text`` in their fixed order."""
    tc = text_config(text_cfg)
    if tc.source == "stdlib":
        yield from stdlib_documents()
    elif tc.source == "files":
        yield from file_documents(tc.paths, tc.suffixes)
    else:  # hf (the schema admits no other source)
        yield from hf_documents(tc.hf.path, tc.hf.name, tc.hf.split, tc.hf.text_field, tc.hf.max_documents)


def _source_fingerprint(text_cfg: Any) -> dict:
    """What identifies the corpus without reading it (cheap cache key)."""
    tc = text_config(text_cfg)
    if tc.source == "stdlib":
        return {"source": "stdlib", "python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}
    if tc.source == "files":
        files = _expand_files(tc.paths, tuple(tc.suffixes))
        return {"source": "files", "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                                             for f in files]}
    return {"source": "hf", **{k: getattr(tc.hf, k) for k in ("path", "name", "split", "text_field",
                                                               "max_documents")}}


# ------------------------------------------------------------------------------------- cached shards
@dataclass
class TextSplit:
    """Memory-mapped token shards of one split; ``sample`` draws windows without loading the rest."""

    shards: list[np.ndarray]

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.shards))

    def _check(self, length: int) -> np.ndarray:
        starts = np.array([max(len(s) - length, 0) for s in self.shards], dtype=np.int64)
        if starts.sum() == 0:
            raise TextDataError(f"text split has {self.n_tokens} tokens in shards of at most "
                                f"{max((len(s) for s in self.shards), default=0)}; windows of {length} tokens "
                                "need a larger corpus (more text, or a smaller text.val_fraction / seq_len)")
        return starts

    def draw(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """``n`` random window starts as ``[n, 2]`` int64 rows ``(shard, offset)`` (reads nothing)."""
        starts = self._check(length)
        shard = rng.choice(len(self.shards), size=n, p=starts / starts.sum())
        offs = (rng.random(n) * starts[shard]).astype(np.int64)
        return np.stack([shard.astype(np.int64), offs], axis=1)

    def read(self, where: np.ndarray, length: int) -> np.ndarray:
        """Windows at ``where`` ``[n, 2]`` (from :meth:`draw`) -> int64 tokens ``[n, length]``."""
        if len(where) == 0:
            return np.zeros((0, length), np.int64)
        return np.stack([np.asarray(self.shards[s][o:o + length], dtype=np.int64) for s, o in where])

    def sample(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """``n`` random windows of ``length`` tokens -> int64 ``[n, length]``."""
        return self.read(self.draw(rng, n, length), length)

    def windows(self, n: int, length: int) -> np.ndarray:
        """Up to ``n`` evenly spaced windows of ``length`` tokens (deterministic, for evaluation).

        Returns int64 ``[n', length]``, ``1 <= n' <= n`` (fewer when the split has fewer distinct starts).
        """
        starts = self._check(length)
        cum = np.cumsum(starts)
        points = np.unique(np.linspace(0, cum[-1] - 1, n).astype(np.int64))
        shard = np.searchsorted(cum, points, side="right")
        offs = points - np.concatenate([[0], cum])[shard]
        return np.stack([np.asarray(self.shards[s][o:o + length], dtype=np.int64) for s, o in zip(shard, offs)])


@dataclass
class TextCorpus:
    """Tokenised train/validation splits of a text source, cached on disk."""

    train: TextSplit
    val: TextSplit
    vocab_size: int
    eot: int
    tokenizer: str
    path: Path
    meta: dict


def _split_of(doc_index: int, val_fraction: float) -> str:
    # a hash of the index (not of the text) keeps the split stable and spreads validation over the corpus
    return "val" if (zlib.crc32(doc_index.to_bytes(8, "little")) % 100_000) < val_fraction * 100_000 else "train"


def load_text_corpus(text_cfg: Any, home: str | os.PathLike, *, rank: int = 0) -> TextCorpus:
    """Tokenise (once) and memory-map the corpus of ``cfg.text`` under ``<home>/cache/text/<hash>/``.

    The cache key is a hash of the source fingerprint (Python version for ``stdlib``; file paths, sizes
    and mtimes for ``files``; dataset coordinates for ``hf``), tokenizer, validation fraction and the
    cache format. Writes are atomic (a temporary folder renamed into place). Only ``rank`` 0 builds.
    """
    text_cfg = text_config(text_cfg)  # validated: val_fraction in (0, 1), shard_tokens >= 1, ...
    tok_name, encoding = text_cfg.tokenizer, text_cfg.tiktoken_encoding
    val_fraction, shard_tokens = text_cfg.val_fraction, text_cfg.shard_tokens
    key = {"format": CACHE_FORMAT, "fingerprint": _source_fingerprint(text_cfg), "tokenizer": tok_name,
           "encoding": encoding if tok_name == "tiktoken" else None, "val_fraction": val_fraction,
           "max_chars": text_cfg.max_chars, "shard_tokens": shard_tokens}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(home).expanduser() / "cache" / "text" / digest
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        if rank != 0:
            raise TextDataError(f"text cache {path} is missing on rank {rank}; rank 0 builds it first")
        _build_cache(text_cfg, path, key, tok_name, encoding, val_fraction, shard_tokens)
    meta = json.loads(manifest_path.read_text())
    splits = {s: TextSplit([np.load(path / f, mmap_mode="r") for f in meta["shards"][s]])
              for s in ("train", "val")}
    for s, sp in splits.items():
        if sp.n_tokens == 0:
            raise TextDataError(f"the text corpus has no {s} tokens ({path}); add text or change text.val_fraction")
    return TextCorpus(splits["train"], splits["val"], meta["vocab_size"], meta["eot"], tok_name, path, meta)


def _build_cache(text_cfg: Any, path: Path, key: dict, tok_name: str, encoding: str, val_fraction: float,
                 shard_tokens: int) -> None:
    import shutil
    import tempfile

    from gravprobe.common import progress

    tok = get_tokenizer(tok_name, encoding)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    max_chars = text_config(text_cfg).max_chars
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    buffers: dict[str, list[int]] = {"train": [], "val": []}
    shards: dict[str, list[str]] = {"train": [], "val": []}
    counts = {"train": 0, "val": 0, "documents": 0, "chars": 0}

    def flush(split: str, final: bool = False) -> None:
        buf = buffers[split]
        while len(buf) >= shard_tokens or (final and buf):
            chunk, buffers[split] = buf[:shard_tokens], buf[shard_tokens:]
            buf = buffers[split]
            name = f"{split}_{len(shards[split]):03d}.npy"
            np.save(tmp / name, np.asarray(chunk, dtype=dtype))
            shards[split].append(name)
            counts[split] += len(chunk)

    try:
        log.info("tokenising text corpus (%s, tokenizer=%s) into %s", key["fingerprint"]["source"], tok_name, path)
        for i, doc in enumerate(progress(documents(text_cfg), desc="text corpus", unit="doc", leave=False)):
            doc = doc.strip()
            if not doc:
                continue
            split = _split_of(i, val_fraction)
            buffers[split].extend(tok.encode(doc))
            buffers[split].append(tok.eot)
            counts["documents"] += 1
            counts["chars"] += len(doc)
            flush(split)
            if max_chars is not None and counts["chars"] >= max_chars:
                break
        flush("train", final=True)
        flush("val", final=True)
        meta = {"key": key, "vocab_size": tok.vocab_size, "eot": tok.eot, "dtype": np.dtype(dtype).name,
                "shards": shards, "tokens": {"train": counts["train"], "val": counts["val"]},
                "documents": counts["documents"], "chars": counts["chars"]}
        atomic_write_json(tmp / "manifest.json", meta)
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first: keep theirs
            if not (path / "manifest.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("text corpus: %d documents, %d chars, %d train / %d val tokens", counts["documents"],
             counts["chars"], counts["train"], counts["val"])
