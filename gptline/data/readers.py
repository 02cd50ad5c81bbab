"""Readers: every source type streamed as documents, with bad records skipped and counted, never fatal.

Types: `warc` (WARC and ARC, plain or gzip; Common Crawl WARC responses and WET conversion records), `jsonl`
(optionally .gz/.bz2/.zst), `parquet`, `text` (a tree of .txt/.md files, one document each) and `code` (a source
tree filtered by extension, one document per file). Paths are files, directories or globs, local or on any
`pyarrow.fs` filesystem. HTML becomes text by main-content extraction (resiliparse by default, trafilatura when
installed and chosen) after charset detection; non-200 and non-HTML responses are skipped and counted.

Nothing is read whole before its size is known: a record (a WARC payload, a text or code file, a Parquet value)
over `ReadLimits.max_record_bytes` and a JSONL line over `max_line_bytes` are skipped and counted
(`oversized_records`, `oversized_lines`) after reading at most the cap plus one byte of them, the rest streamed
past in bounded pieces, so a compression bomb costs time, never memory.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from warcio.archiveiterator import ArchiveIterator

from pipeline.errors import GptlineError

SOURCE_TYPES = ("warc", "jsonl", "parquet", "text", "code")
DEFAULT_EXTENSIONS = {"text": [".txt", ".md", ".markdown"], "code": [".py"]}
HTML_TYPES = ("text/html", "application/xhtml+xml")


MAX_LINE_BYTES = 64 << 20  # a JSONL line, its newline included: crawl_mix's sources and the chat data alike


@dataclass
class ReadLimits:
    max_record_bytes: int = 64 << 20  # a WARC payload, a text or code file, a Parquet text value
    max_line_bytes: int = MAX_LINE_BYTES

    def validate(self) -> list[tuple[str, str]]:
        return [(k, "must be >= 1") for k in ("max_record_bytes", "max_line_bytes") if getattr(self, k) < 1]


@dataclass
class RawDocument:
    text: str
    url: str
    record: int  # position of the record within its file
    extra: str = ""  # e.g. WARC-Date or a title


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def expand_paths(patterns: list[str], extensions: list[str], key: str) -> list[str]:
    """Files matched by each pattern (file, directory or glob), sorted; a pattern matching nothing is an error."""
    found: list[str] = []
    for i, pattern in enumerate(patterns):
        fs, path = filesystem(pattern)
        scheme = pattern.split("://", 1)[0] + "://" if "://" in pattern else ""
        has_glob = any(ch in path for ch in "*?[")
        base = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0] if has_glob else path
        info = fs.get_file_info(base)
        matches: list[str] = []
        if info.type == pafs.FileType.File and not has_glob:
            matches = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            files = [f.path for f in infos if f.type == pafs.FileType.File]
            if has_glob:
                matches = [f for f in files if fnmatch.fnmatch(f, path)]
            else:
                matches = [f for f in files if not extensions or f.lower().endswith(tuple(extensions))]
        if not matches:
            raise GptlineError(f"{key}[{i}]: no file matches {pattern!r}")
        found += [scheme + m if scheme else m for m in matches]
    return sorted(set(found))


def decode_html(payload: bytes, declared_charset: str | None) -> str:
    """Bytes to str: the declared charset when it decodes cleanly, else detection, never an exception."""
    if declared_charset:
        try:
            return payload.decode(declared_charset)
        except (LookupError, UnicodeDecodeError):
            pass
    return bytes_to_str(payload, detect_encoding(payload))


def html_to_text(html: str, extractor: str) -> str:
    if extractor == "trafilatura":
        import trafilatura

        return trafilatura.extract(html, include_comments=False, include_tables=False) or ""
    return extract_plain_text(html, main_content=True, alt_texts=False, links=False, list_bullets=True)


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "charset" and value:
            return value.strip("\"' ")
    return None


def read_warc(stream, counts: Counter, extractor: str, limits: ReadLimits) -> Iterator[RawDocument]:
    """HTML responses (status 200) become documents; WET conversion records are taken as they are."""
    records = iter(ArchiveIterator(stream, arc2warc=True))
    record_no = -1
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception:
            # Truncated or corrupt gzip (EOFError, zlib.error), garbage between records, a broken header
            # (ArchiveLoadFailed, ValueError, AttributeError from its header parser): the rest of the file cannot
            # be located. What was read before stands; the damage is counted. Found by tests/faults/test_fuzz.py.
            counts["bad_records"] += 1
            counts["truncated_files"] += 1
            return
        record_no += 1
        kind = record.rec_type
        if kind not in ("response", "resource", "conversion"):
            continue
        counts["records"] += 1
        url = (record.rec_headers.get_header("WARC-Target-URI") or "").strip().strip("<>")
        date = record.rec_headers.get_header("WARC-Date") or ""
        try:
            payload = record.content_stream().read(limits.max_record_bytes + 1)  # the iterator skips the rest
        except Exception:
            counts["bad_records"] += 1
            continue
        if len(payload) > limits.max_record_bytes:
            counts["oversized_records"] += 1
            continue
        if kind == "conversion":
            yield RawDocument(payload.decode("utf-8", "replace"), url, record_no, date)
            continue
        if record.http_headers is not None:
            status = record.http_headers.get_statuscode()
            if status != "200":
                counts["skipped_status"] += 1
                continue
            content_type = record.http_headers.get_header("Content-Type") or ""
        else:
            content_type = record.rec_headers.get_header("Content-Type") or ""
        if not content_type.lower().startswith(HTML_TYPES):
            counts["skipped_non_html"] += 1
            continue
        html = decode_html(payload, _charset(content_type))
        yield RawDocument(html_to_text(html, extractor), url, record_no, date)


def capped_lines(stream, max_bytes: int) -> Iterator[bytes | None]:
    """The binary stream's lines, each read with at most `max_bytes` + 1 bytes in memory; None for a longer one,
    whose rest is read past in pieces."""
    while line := stream.readline(max_bytes + 1):
        if len(line) <= max_bytes:
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(max_bytes + 1)
        yield None


def read_jsonl(stream, counts: Counter, text_field: str, url_field: str, limits: ReadLimits) -> Iterator[RawDocument]:
    for record_no, raw in enumerate(capped_lines(stream, limits.max_line_bytes)):
        counts["records"] += 1
        if raw is None:
            counts["oversized_lines"] += 1
            continue
        try:
            obj = json.loads(raw)
            text = obj[text_field]
            if not isinstance(text, str):
                raise TypeError(f"{text_field!r} is {type(text).__name__}, not a string")
            url = obj.get(url_field) or ""
            yield RawDocument(text, url if isinstance(url, str) else "", record_no, str(obj.get("title", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            counts["bad_records"] += 1


def read_parquet(
    handle, counts: Counter, text_field: str, url_field: str, path: str, limits: ReadLimits
) -> Iterator[RawDocument]:
    parquet = pq.ParquetFile(handle)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise GptlineError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    columns = [text_field] + ([url_field] if url_field in names else [])
    record_no = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column(text_field).to_pylist()
        urls = batch.column(url_field).to_pylist() if url_field in names else [""] * len(texts)
        for text, url in zip(texts, urls, strict=True):
            counts["records"] += 1
            if isinstance(text, str) and len(text) > limits.max_record_bytes:  # characters: at least as many bytes
                counts["oversized_records"] += 1
            elif isinstance(text, str):
                yield RawDocument(text, url if isinstance(url, str) else "", record_no)
            else:
                counts["bad_records"] += 1
            record_no += 1


def read_plain_file(stream, counts: Counter, strict_utf8: bool, limits: ReadLimits) -> Iterator[RawDocument]:
    counts["records"] += 1
    payload = stream.read(limits.max_record_bytes + 1)
    if len(payload) > limits.max_record_bytes:
        counts["oversized_records"] += 1
        return
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        if strict_utf8:  # source code that is not UTF-8 is almost always binary or generated
            counts["bad_records"] += 1
            return
        text = bytes_to_str(payload, detect_encoding(payload))
    yield RawDocument(text, "", 0)


def read_documents(
    path: str,
    source_type: str,
    counts: Counter,
    text_field: str,
    url_field: str,
    extractor: str,
    limits: ReadLimits | None = None,
) -> Iterator[RawDocument]:
    """All documents of one file. Damage inside a file is counted in `counts` (bad_records, truncated_files,
    bad_files) and never raised; a Parquet file without the configured text column raises GptlineError."""
    fs, inner = filesystem(path)
    limits = limits or ReadLimits()
    try:
        if source_type == "parquet":
            with fs.open_input_file(inner) as handle:
                yield from read_parquet(handle, counts, text_field, url_field, path, limits)
            return
        compression = "detect" if source_type == "jsonl" else None
        with fs.open_input_stream(inner, compression=compression) as stream:
            if source_type == "warc":
                # Decompress with Python's gzip (multi-member aware) rather than warcio's reader, which takes a
                # truncated member for a clean end of file: here truncation raises and is counted.
                buffered = io.BufferedReader(stream)
                is_gzip = buffered.peek(2)[:2] == b"\x1f\x8b"
                warc = gzip.GzipFile(fileobj=buffered) if is_gzip else buffered
                yield from read_warc(warc, counts, extractor, limits)
            elif source_type == "jsonl":
                yield from read_jsonl(io.BufferedReader(stream), counts, text_field, url_field, limits)  # readline
            else:
                yield from read_plain_file(stream, counts, source_type == "code", limits)
    except (OSError, ValueError, EOFError, zlib.error):  # truncated or corrupt compression, not the format it claims
        counts["bad_files"] += 1
