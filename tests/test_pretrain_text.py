"""Language data: tokenizers, local-file loader, memory-mapped cache, offline default, sampling."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from gravprobe.pretrain.text import (
    ByteTokenizer,
    TextDataError,
    documents,
    get_tokenizer,
    load_text_corpus,
    stdlib_documents,
)


def _files_cfg(paths, **kw):
    return {"source": "files", "paths": [str(p) for p in paths], "suffixes": [".txt", ".md"],
            "tokenizer": "byte", "val_fraction": 0.2, **kw}


@pytest.fixture
def text_folder(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(30):
        folder = d / "sub" if i % 2 else d
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + "The planet moves around the star. " * 20)
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    s = "Kepler's third law: T² ∝ a³."
    ids = tok.encode(s)
    assert max(ids) < 256 and tok.vocab_size == 257 and tok.eot == 256
    assert tok.decode(ids + [tok.eot]) == s
    with pytest.raises(ValueError, match="byte"):
        get_tokenizer("sentencepiece")


def test_local_folder_loader_and_cache(text_folder, tmp_path):
    cfg = _files_cfg([text_folder])
    docs = list(documents(cfg))
    assert len(docs) == 30                               # .bin ignored, subfolder searched
    assert docs[0].startswith("Document 0") and docs[1].startswith("Document 2")  # sorted paths
    corpus = load_text_corpus(cfg, tmp_path / "home")
    assert corpus.vocab_size == 257
    assert corpus.train.n_tokens > 0 and corpus.val.n_tokens > 0
    total = sum(len(d.strip().encode()) + 1 for d in docs)
    assert corpus.train.n_tokens + corpus.val.n_tokens == total
    assert all(isinstance(s, np.memmap) for s in corpus.train.shards)
    assert corpus.path.parent == tmp_path / "home" / "cache" / "text"
    # second load hits the cache (same folder), and the text survives the round trip
    again = load_text_corpus(cfg, tmp_path / "home")
    assert again.path == corpus.path
    text = ByteTokenizer().decode(np.asarray(again.train.shards[0][:200]))
    assert "The planet moves around the star." in text
    # a changed file changes the cache key
    (text_folder / "doc00.txt").write_text("changed " * 50)
    assert load_text_corpus(cfg, tmp_path / "home").path != corpus.path


def test_single_files_and_missing_paths(tmp_path):
    f = tmp_path / "a.md"
    f.write_text("hello world")
    assert list(documents(_files_cfg([f]))) == ["hello world"]
    with pytest.raises(TextDataError, match="does not exist"):
        list(documents(_files_cfg([tmp_path / "nope.txt"])))
    with pytest.raises(TextDataError, match="text.paths"):
        list(documents(_files_cfg([])))
    with pytest.raises(ValueError, match="text.source"):
        list(documents({"source": "s3"}))


def test_sampling_is_deterministic_and_in_bounds(text_folder, tmp_path):
    corpus = load_text_corpus(_files_cfg([text_folder], shard_tokens=1000), tmp_path / "home")
    assert len(corpus.train.shards) > 1                 # several shards
    a = corpus.train.sample(np.random.default_rng(3), 16, 65)
    b = corpus.train.sample(np.random.default_rng(3), 16, 65)
    assert a.shape == (16, 65) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert a.max() <= 256
    w = corpus.val.windows(4, 33)
    assert w.shape[1] == 33 and 1 <= len(w) <= 4
    np.testing.assert_array_equal(w, corpus.val.windows(4, 33))
    with pytest.raises(TextDataError, match="larger corpus"):
        corpus.val.sample(np.random.default_rng(0), 1, 10**7)


def test_offline_default_never_opens_a_connection(monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cfg = {"source": "stdlib", "tokenizer": "byte", "val_fraction": 0.05, "max_chars": 700_000}   # past the topics into the docstrings
    corpus = load_text_corpus(cfg, tmp_path / "home")
    assert corpus.train.n_tokens > 200_000 and corpus.val.n_tokens > 1_000
    text = ByteTokenizer().decode(np.asarray(corpus.train.shards[0][:5000]))
    assert " the " in text                                # English prose


def test_stdlib_corpus_is_deterministic_and_imports_nothing():
    import sys

    before = set(sys.modules)
    first = [d for _, d in zip(range(400), stdlib_documents())]
    second = [d for _, d in zip(range(400), stdlib_documents())]
    assert first == second and len(first) == 400
    assert not {"antigravity", "this", "tkinter", "idlelib", "turtle"} & (set(sys.modules) - before)


def test_tiktoken_missing_or_unavailable_gives_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tiktoken(name, *a, **k):
        if name == "tiktoken":
            raise ImportError("no tiktoken")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tiktoken)
    with pytest.raises(TextDataError, match="tiktoken"):
        get_tokenizer("tiktoken")


def test_hf_streaming_plumbing_with_a_stand_in_datasets_module(monkeypatch, tmp_path):
    """The `hf` source streams `max_documents` rows of `text_field` (a stand-in for the `datasets` package)."""
    import sys
    import types

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    calls = {}

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.update(path=path, name=name, split=split, streaming=streaming)
        return iter({"text": f"web page {i}: " + "gravity pulls. " * 30, "id": i} for i in range(10**6))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with initialize_config_module("gravprobe.conf", version_base="1.3"):
        cfg = compose("config", overrides=["text=fineweb_edu", "text.tokenizer=byte", "text.hf.max_documents=40"])
    corpus = load_text_corpus(OmegaConf.to_container(cfg.text), tmp_path / "home")
    assert calls == {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train", "streaming": True}
    assert corpus.meta["documents"] == 40
    monkeypatch.setitem(sys.modules, "datasets", None)          # not installed -> clear error
    with pytest.raises(TextDataError, match=r"gravprobe\[text\]"):
        list(documents({"source": "hf", "hf": {"path": "x"}}))
