"""Fuzzed inputs: real files mutated (bytes flipped, cut, inserted, records garbled) must never crash a reader: each
bad record is skipped and counted, or the file fails with a clear error that names it. Hypothesis draws a bounded
number of cases per reader (derandomized, so CI sees the same cases every run)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptline.data.chat import Skipped, read_comparisons, read_conversations, read_prompts
from gptline.data.readers import MAX_LINE_BYTES, read_documents
from pipeline.errors import GptlineError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
FUZZ = settings(max_examples=60, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """The original with a few random edits: flipped bytes, a cut, an inserted run of bytes, a truncation."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if edit == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:]
    return bytes(data)


SKIPPED = ("bad_records", "skipped_status", "skipped_non_html", "oversized_records", "oversized_lines")


def read_all(path: Path, source_type: str) -> tuple[int, Counter]:
    """Every record read is a document or a skip counted by its reason (a truncation is one bad record more)."""
    counts: Counter = Counter()
    documents = list(read_documents(str(path), source_type, counts, "text", "url", "resiliparse"))
    assert all(isinstance(d.text, str) for d in documents)
    if not counts["bad_files"]:
        skipped = sum(counts[reason] for reason in SKIPPED)
        assert len(documents) + skipped == counts["records"] + counts["truncated_files"], counts
    return len(documents), counts


WARC = (SHARED / "warc" / "warcio-example-resource.warc.gz").read_bytes() if SHARED.exists() else b""
PLAIN_WARC = (SHARED / "warc" / "warcio-example-iana.org-chunked.warc").read_bytes() if SHARED.exists() else b""
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside this checkout")


@needs_shared
@FUZZ
@given(data=st.data())
def test_mutated_warc_files_never_crash_the_reader(tmp_path, data):
    for name, original in (("a.warc.gz", WARC), ("b.warc", PLAIN_WARC)):
        path = tmp_path / name
        path.write_bytes(data.draw(mutated(original)))
        read_all(path, "warc")


JSONL = "".join(
    json.dumps({"text": f"document {i} " * 20, "url": f"https://example.com/{i}"}) + "\n" for i in range(20)
)


def compressed(data: bytes, codec: str) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as f:
        f.write(data)
    return sink.getvalue().to_pybytes()


@FUZZ
@given(data=st.data())
def test_mutated_jsonl_never_crashes_the_reader(tmp_path, data):
    plain = tmp_path / "docs.jsonl"
    plain.write_bytes(data.draw(mutated(JSONL.encode())))
    read_all(plain, "jsonl")
    for suffix, codec in ((".gz", "gzip"), (".bz2", "bz2"), (".zst", "zstd")):
        packed = tmp_path / f"docs.jsonl{suffix}"
        packed.write_bytes(data.draw(mutated(compressed(JSONL.encode(), codec))))
        read_all(packed, "jsonl")


def parquet_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "original.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(50)], "url": ["u"] * 50}), path)
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_mutated_parquet_is_read_or_counted_as_a_bad_file(tmp_path, data):
    path = tmp_path / "docs.parquet"
    path.write_bytes(data.draw(mutated(parquet_bytes(tmp_path))))
    try:
        read_all(path, "parquet")
    except GptlineError as e:  # a file whose schema lost the text column: named in the error
        assert str(path) in str(e)


CONVERSATIONS = [
    {"prompt": "What is a sonnet?", "response": "A poem of fourteen lines."},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    },
]
COMPARISONS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Pick", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
]
garbled_value = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip


@st.composite
def garbled_records(draw, records: list[dict]) -> list[str]:
    """Valid records, some with a field replaced by a value of the wrong kind or removed, some lines cut."""
    lines = []
    for record in records * 3:
        record = json.loads(json.dumps(record))
        if draw(st.booleans()):
            key = draw(st.sampled_from(sorted(record)))
            if draw(st.booleans()):
                record[key] = draw(garbled_value)
            else:
                del record[key]
        line = json.dumps(record)
        if draw(st.integers(0, 9)) == 0:
            line = line[: draw(st.integers(0, len(line)))]
        lines.append(line)
    return lines


@FUZZ
@given(data=st.data())
def test_garbled_chat_and_preference_records_are_skipped_and_counted(tmp_path, data):
    for records, readers in ((CONVERSATIONS, (read_conversations, read_prompts)), (COMPARISONS, (read_comparisons,))):
        lines = data.draw(garbled_records(records))
        path = tmp_path / "records.jsonl"
        path.write_text("\n".join(lines) + "\n")
        for reader in readers:
            skipped = Skipped()
            found = reader([str(path)], "fuzz.data", skipped, MAX_LINE_BYTES)
            if any(line.strip() for line in lines):  # every non-blank line is used or counted
                assert len(found) + sum(skipped.counts.values()) >= 1
            assert all(str(path) in entry["first"] for entry in skipped.summary().values())


@FUZZ
@given(data=st.data())
def test_mutated_compressed_chat_files_are_skipped_or_named(tmp_path, data):
    path = tmp_path / "records.jsonl.gz"
    original = gzip.compress("".join(json.dumps(r) + "\n" for r in CONVERSATIONS * 5).encode())
    path.write_bytes(data.draw(mutated(original)))
    skipped = Skipped()
    found = read_conversations([str(path)], "fuzz.data", skipped, MAX_LINE_BYTES)
    assert len(found) <= 10 and all(str(path) in entry["first"] for entry in skipped.summary().values())
