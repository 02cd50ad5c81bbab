"""Tokenizer training and export, the tokenize stage, on a small real corpus in crawl-mix's format."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from gptline.data.formats import read_ipc
from gptline.training.loaders import TokenStream
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources
from pipeline.errors import GptlineError
from stages import tokenize, tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "tinyshakespeare.txt"
ODD = [
    "",
    "   ",
    "tabs\tand\r\nwindows line ends\r\n",
    "emoji 🙂👍🏽 and flags 🇫🇷",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "עברית ومرحبا بالعالم",
    "combining e\u0301 and precomposed é, ligature ﬁ, fullwidth ＡＢＣ",
    "zero\u200bwidth and nbsp\u00a0here",
    "control \x00\x07\x1b chars",
    "digits 1234567890 3.14159",
    "<|user|> hello <|end|>",
    "  double  spaces   and trailing   ",
]


def corpus(tmp_path: Path, texts: list[str], name: str = "corpus") -> Path:
    root = tmp_path / name
    for split, part in (("train", texts), ("validation", texts[:3])):
        (root / split).mkdir(parents=True)
        table = pa.table({
            "id": [f"{split}{i}" for i in range(len(part))],
            "text": part,
            "source": ["books" if i % 2 else "web" for i in range(len(part))],
            "copy": [0] * len(part),
        })  # fmt: skip
        pq.write_table(table.slice(0, len(part) // 2), root / split / "a-0000.parquet")
        pq.write_table(table.slice(len(part) // 2), root / split / "b-0000.parquet")
    return root


def code_docs() -> list[str]:
    """Real indented source (the standard library's), so the tokenizer learns pieces of whitespace runs."""
    import inspect
    import json.decoder
    import shlex
    import textwrap

    return [inspect.getsource(module) for module in (json.decoder, shlex, textwrap)]


def shakespeare_docs() -> list[str]:
    if not SHAKESPEARE.exists():
        pytest.skip(f"needs {SHAKESPEARE} (the shared real-data folder beside the checkout)")
    text = SHAKESPEARE.read_text()
    return [p for p in text.split("\n\n") if p.strip()][:3000]


def train_tokenizer(tmp_path: Path, docs: list[str], **overrides) -> Path:
    out = tmp_path / f"tok-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    cfg = typed(tokenizer.TokenizerConfig, {"vocab_size": 1000, **overrides})
    tokenizer.run(cfg, {"crawl_mix": corpus(tmp_path, docs, out.name + "-corpus")}, out, StageContext("tokenizer"))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("tokenizer")
    docs = shakespeare_docs() + code_docs() + ODD + ["x" * 200_000]  # a very long document too
    return train_tokenizer(tmp, docs), docs


def test_encode_decode_is_lossless_on_every_document(trained):
    out, docs = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert all(sp.decode(sp.encode(d)) == d for d in docs)
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert meta["vocab_size"] == 1000
    ids = meta["special_ids"]
    assert (ids["unk"], ids["bos"], ids["end_of_text"], ids["pad"]) == (0, 1, 2, 3)
    assert len({ids[k] for k in ("system", "user", "assistant", "end_of_turn", "reward")}) == 5
    assert sp.id_to_piece(ids["user"]) == "<|user|>" and sp.is_control(ids["user"])
    # Control symbols: typed in raw text, a chat marker is ordinary text (and decodes back to itself).
    assert ids["user"] not in sp.encode("<|user|>") and sp.decode(sp.encode("<|user|>")) == "<|user|>"


def test_encoding_word_aligned_pieces_gives_the_ids_of_the_whole_text(trained):
    out, docs = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert any(set(sp.id_to_piece(i)) == {"▁"} and len(sp.id_to_piece(i)) > 1 for i in range(sp.get_piece_size()))
    long_docs = ["\n\n".join(docs[i : i + 40]) for i in range(0, 3000, 40)]  # Shakespeare, up to 20k characters
    tricky = ["a" + " " * k + "b" + "▁" * (k % 3) + " " * k + "c " * 5 for k in range(12)] + [" ▁ x" * 30]
    for size in (1, 7, 64, tokenize.PIECE_CHARS):
        for text in long_docs + code_docs() + ODD + tricky:
            pieces = list(tokenize.word_aligned_pieces(text, size))
            assert "".join(pieces) == text
            # Each cut is just before a run of spaces, never inside one.
            assert all(b[0] == " " and a[-1] not in " \u2581" for a, b in itertools.pairwise(pieces))
            assert [i for p in pieces for i in sp.encode(p)] == sp.encode(text), (size, text[:80])


def test_hugging_face_export_gives_identical_ids(trained):
    from transformers import AutoTokenizer

    out, docs = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token == "</s>" and hf.pad_token_id == 3
    mismatched = [d for d in docs if hf.encode(d, add_special_tokens=False) != sp.encode(d)]
    assert mismatched == []
    sample = docs[5]
    assert hf.decode(sp.encode(sample)) == sample


def test_char_model_is_character_level(tmp_path):
    docs = shakespeare_docs()
    out = train_tokenizer(tmp_path, docs, model_type="char", vocab_size=512, character_coverage=1.0)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    chars = set("".join(docs))
    assert sp.get_piece_size() <= 512 and len(sp.encode("First Citizen")) == len("First Citizen")
    assert len(chars) < sp.get_piece_size()
    assert all(sp.decode(sp.encode(d)) == d for d in docs[:200])


def test_vocabulary_larger_than_the_data_supports_is_a_clear_error(tmp_path):
    with pytest.raises(GptlineError, match=r"tokenizer.vocab_size=50000 is more than the training text supports"):
        train_tokenizer(
            tmp_path, ["a small corpus of very few words.", "only a handful of pieces here."], vocab_size=50000
        )


def test_training_is_deterministic(tmp_path):
    docs = shakespeare_docs()[:1500]
    first, second = train_tokenizer(tmp_path, docs), train_tokenizer(tmp_path, docs)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    # The .model file also records its training paths, which differ: compare what it encodes with.
    a, b = (spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")) for d in (first, second))
    pieces = [[(m.id_to_piece(i), m.get_score(i)) for i in range(m.get_piece_size())] for m in (a, b)]
    assert pieces[0] == pieces[1]


def test_tokenize_writes_memory_mappable_shards_that_decode_to_the_corpus(trained, tmp_path):
    out_tok, docs = trained
    corpus_dir = corpus(tmp_path, docs)
    results = []
    for attempt, task_bytes in (("first", 256_000), ("second", 256_000), ("per-shard", 1)):
        out = tmp_path / attempt
        out.mkdir()
        ctx = StageContext("tokenize", resources=StageResources(num_workers=2))
        metrics = tokenize.run(
            typed(tokenize.TokenizeConfig, {"task_bytes": task_bytes}),
            {"crawl_mix": corpus_dir, "tokenizer": out_tok},
            out,
            ctx,
        )
        results.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.arrow"))})
    assert results[0] == results[1]  # byte-identical shards
    # The two small corpus shards are one task (one token shard) by default, two with task_bytes=1: same stream.
    assert [p.name for p in TokenStream(tmp_path / "first" / "train").paths] == ["a-0000.tokens.arrow"]
    assert len(TokenStream(tmp_path / "per-shard" / "train").paths) == 2
    streams = [TokenStream(tmp_path / attempt / "train") for attempt in ("first", "per-shard")]
    assert np.array_equal(*(stream.slice(0, stream.total) for stream in streams))
    summary = json.loads((tmp_path / "first" / "tokens.json").read_text())
    assert summary["dtype"] == "uint16" and metrics["train_tokens"] == summary["train"]["tokens"]
    assert sum(summary["train"]["tokens_per_source"].values()) == summary["train"]["tokens"]
    sp = spm.SentencePieceProcessor(model_file=str(out_tok / "tokenizer.model"))
    stream = TokenStream(tmp_path / "first" / "train")
    assert stream.arrays[0].dtype == np.uint16 and not stream.arrays[0].flags.owndata  # a view of the mapped file
    index = read_ipc(tmp_path / "first" / "train" / "a-0000.index.arrow")
    tokens = stream.arrays[0]
    decoded = []
    for start, length in zip(index.column("start").to_pylist(), index.column("length").to_pylist(), strict=True):
        assert tokens[start + length - 1] == 2  # every document ends with end-of-text
        decoded.append(sp.decode(tokens[start : start + length - 1].tolist()))
    assert decoded == docs
