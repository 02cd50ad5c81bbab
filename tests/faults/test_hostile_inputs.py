"""Hostile inputs: every regex applied to document text runs in linear time on adversarial text; records and
lines over the configured caps are skipped and counted in bounded memory, compression bombs (gzip, bz2, zstd)
included; committed data files are fsynced before their manifest."""

from __future__ import annotations

import io
import os
import random
import re
import time
import tracemalloc
from collections import Counter

import pyarrow as pa
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from gptline.data import dedup, filters
from gptline.data.chat import HH_TURN, Skipped, read_comparisons, read_conversations, read_prompts
from gptline.data.readers import ReadLimits, read_documents
from gptline.data.verifiable import read_tasks
from pipeline.artifacts import Store
from pipeline.config import ConfigError, typed, validate
from stages import dpo, grpo, ppo, rm, sft

SECONDS_PER_MB = 5.0  # linear code takes well under a second per MB; the quadratic email regex took minutes
ADVERSARIAL = {
    "local-part run": "a." * (128 << 10),
    "local parts before an @": ("x." * 32 + "@" + "a." * 200) * 512,
    "punctuation run": "!" * (256 << 10),
    "dotted digits": "1." * (128 << 10),
    "colon hex": "a:" * (128 << 10),
    "apostrophes": "a'" * (128 << 10),
    "blank lines": "\n" * (256 << 10) + "x",
    "turn markers": "\n\nHuman: " * (24 << 10),
}
TEXT_REGEXES = {
    "scrub_pii (emails, IPv4, IPv6)": filters.scrub_pii,
    "words": filters.words_of,
    "sentence ends": filters.SENTENCE_END_RE.findall,
    "paragraphs": lambda text: filters.re.split(r"\n{2,}", text),
    "dedup normalize": dedup.normalize,
    "chat turns": HH_TURN.split,
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_every_regex_on_document_text_is_linear_on_adversarial_text(case):
    text = ADVERSARIAL[case]
    megabytes = len(text.encode()) / 2**20
    for name, fn in TEXT_REGEXES.items():
        start = time.perf_counter()
        fn(text)
        seconds = time.perf_counter() - start
        assert seconds < SECONDS_PER_MB * megabytes, f"{name} took {seconds:.2f} s on {megabytes:.2f} MB of {case}"


def test_emails_are_found_as_the_single_regex_found_them():
    """The linear scan against the quadratic regex it replaces, on short random texts (where that is fast)."""
    reference = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab.@-_%+ é1Z.com\n") for _ in range(rng.randint(0, 40)))
        assert filters.replace_emails(text, "<EMAIL>") == reference.subn("<EMAIL>", text), text


LIMITS = ReadLimits(max_record_bytes=1 << 20, max_line_bytes=1 << 20)
BOMB = b'{"text": "' + b"a" * (48 << 20)  # one line of 48 MB: a few KB compressed
GOOD = b'{"text": "a fine document"}\n'


def read(path, source_type: str) -> tuple[list, Counter, int]:
    counts: Counter = Counter()
    tracemalloc.start()
    try:
        docs = list(read_documents(str(path), source_type, counts, "text", "url", "resiliparse", LIMITS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return docs, counts, peak


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst"])
def test_a_compression_bomb_line_is_skipped_and_counted_in_bounded_memory(tmp_path, suffix):
    path = tmp_path / f"bomb.jsonl{suffix}"
    data = GOOD + BOMB + b'"}\n' + GOOD
    with pa.CompressedOutputStream(str(path), {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}[suffix]) as f:
        f.write(data)
    if suffix == ".gz":
        assert path.stat().st_size < 100 << 10
    docs, counts, peak = read(path, "jsonl")
    assert [d.text for d in docs] == ["a fine document"] * 2
    assert counts["oversized_lines"] == 1 and counts["records"] == 3 and counts["bad_records"] == 0
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB held for a line capped at 1 MB"


CHAT_LINES = {
    read_conversations: b'{"prompt": "Hi", "response": "Hello"}\n',
    read_prompts: b'{"prompt": "Hi"}\n',
    read_comparisons: b'{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}\n',
    read_tasks: b'{"prompt": "What is 1 + 1?", "answer": "2"}\n',
}


@pytest.mark.parametrize("reader", list(CHAT_LINES), ids=lambda reader: reader.__name__)
def test_a_gzip_bomb_line_in_chat_data_is_skipped_and_counted_in_bounded_memory(tmp_path, reader):
    """sft's conversations, ppo's prompts, rm's and dpo's comparisons, grpo's tasks: the line cap of their
    `max_line_bytes` key holds there as in crawl_mix's sources."""
    path = tmp_path / "bomb.jsonl.gz"
    good = CHAT_LINES[reader]
    with pa.CompressedOutputStream(str(path), "gzip") as f:
        f.write(good + b'{"prompt": "' + b"a" * (48 << 20) + b'"}\n' + good)
    assert path.stat().st_size < 100 << 10
    skipped = Skipped()
    tracemalloc.start()
    try:
        found = reader([str(path)], "sft.data", skipped, 1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) == 2
    assert skipped.summary() == {"oversized_line": {"count": 1, "first": f"{path}:2"}}
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB held for a line capped at 1 MB"


@pytest.mark.parametrize("stage", [dpo.DPOConfig, grpo.GRPOConfig, ppo.PPOConfig, rm.RMConfig, sft.SFTConfig])
def test_every_stage_reading_chat_data_takes_a_line_cap_in_config(stage):
    key = f"{stage.__module__.split('.')[-1]}."
    with pytest.raises(ConfigError, match=f"'{key}max_line_bytes': must be >= 1"):
        validate(typed(stage, {"max_line_bytes": 0}), key)


def test_a_10kb_gzip_record_expanding_past_the_cap_is_skipped(tmp_path):
    payload = b"<html><body>" + b"a" * (10 << 20) + b"</body></html>"
    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=True)
    for body in (payload, b"<html><body><p>Small page.</p></body></html>"):
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.0")
        writer.write_record(writer.create_warc_record("http://x/", "response", payload=io.BytesIO(body),
                                                      http_headers=headers))  # fmt: skip
    path = tmp_path / "bomb.warc.gz"
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 20 << 10
    docs, counts, peak = read(path, "warc")
    assert len(docs) == 1 and "Small page." in docs[0].text
    assert counts["oversized_records"] == 1 and counts["records"] == 2
    assert peak < 8 << 20


@pytest.mark.parametrize("source_type", ["text", "code"])
def test_a_file_over_the_record_cap_is_skipped_without_reading_it_whole(tmp_path, source_type):
    path = tmp_path / "big.txt"
    path.write_bytes(b"word " * (1 << 20))
    docs, counts, peak = read(path, source_type)
    assert docs == [] and counts["oversized_records"] == 1 and peak < 4 << 20


def test_data_files_are_fsynced_before_the_manifest_is_written(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    work, _ = store.open_workdir("stage", "0" * 12, tmp_path)
    (work / "data").mkdir()
    for name in ("data/a.parquet", "b.json"):
        (work / name).write_bytes(b"x" * 100)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.commit("stage", "0" * 12, work, {})
    manifest_at = next(i for i, p in enumerate(synced) if ".tmp-" in p and "manifest.json" in p)
    for name in ("data/a.parquet", "b.json"):
        assert str(work / name) in synced[:manifest_at], f"{name} was not fsynced before the manifest"
