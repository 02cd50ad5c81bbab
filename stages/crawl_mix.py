"""crawl-mix: raw sources to a clean, deduplicated, mixed document corpus in Parquet.

Phases, each a fan-out over files (`ctx.map`: one Ray task per file under the runner), so memory is bounded by
one file, never by the corpus:

1. extract + filter (per input file): read records (gptline.data.readers), drop what breaks a quality rule
   (gptline.data.filters; every drop counted per source and rule), scrub PII, and write the survivors with their
   dedup keys (exact text hash, URL hash, one key per MinHash LSH band) to `_work/docs/<file>.parquet`.
2. dedup (per key partition): every partition reads only the keys that hash into it, groups equal keys and emits
   (survivor, duplicate) edges; the driver joins the edges (union-find over duplicates only, not documents) and
   attributes each removal to exact, URL or near duplication, in that order.
3. count (per file): train/validation split by document hash (before mixing), surviving characters per source.
4. mix + write (per file): each source's epoch count e_s = w_s * T / chars_s follows from its weight; a document
   is written floor(e_s) times plus once more with probability frac(e_s), decided by a hash of (seed, id), so the
   result is deterministic and needs no global state. Output shards: `train/` and `validation/` Parquet files
   with id, text, source, url and provenance columns, plus `stats.json` and `report.md`.

A document's id is a hash of its source, URL and text, and a file inside an input artifact is recorded by its path
there ("{fetch}/web/crawl-00000.warc.gz"), so the split, the mixture and the output bytes depend on the content
alone, not on where the store lies.

Each file's phase-1 output is written atomically, so a resumed stage redoes only the files it had not finished.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from gptline.data import filters
from gptline.data.dedup import MinHasher, duplicates_to_drop, group_edges, text_key, unit_hash, url_key
from gptline.data.readers import (
    DEFAULT_EXTENSIONS,
    SOURCE_TYPES,
    RawDocument,
    ReadLimits,
    expand_paths,
    read_documents,
)
from pipeline.checks import at_least
from pipeline.config import typed
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 2  # 2: a document's id (split and mixing hashes) is its content's; paths are recorded as "{fetch}/..."
DEFAULT_RULES = {
    "warc": ["language", "gopher_quality", "gopher_repetition", "c4", "fineweb"],
    "jsonl": ["language", "gopher_quality", "gopher_repetition"],
    "parquet": ["language", "gopher_quality", "gopher_repetition"],
    "text": ["language", "gopher_quality"],
    "code": ["code"],
}
DEDUP_KINDS = ("exact", "url", "near")
COUNTED = (
    "records",
    "bad_records",
    "bad_files",
    "truncated_files",
    "empty_files",
    "skipped_status",
    "skipped_non_html",
    "oversized_records",
    "oversized_lines",
)
ROW_BITS = 32  # a document's rank is (file index << 32) | row within that file's phase-1 output
MIX_BINS = 4096


@dataclass
class SourceConfig:
    type: str = "jsonl"  # warc, jsonl, parquet, text, code
    paths: list[str] = field(default_factory=list)  # files, directories, globs; "{fetch}/..." = an input artifact
    weight: float = 1.0  # target share of the mixture (normalized over sources)
    text_field: str = "text"  # jsonl / parquet
    url_field: str = "url"
    extensions: list[str] = field(default_factory=list)  # text / code trees; empty = the type's default
    rules: list[str] | None = None  # filter groups; None = the type's default (DEFAULT_RULES)
    split_on: str = ""  # text type: cut each file into documents at this separator (e.g. blank lines)
    # Cut documents longer than this (characters; 0 = never) at paragraph breaks into pieces of about this size.
    # The mixture samples whole documents, so a source of a few long ones (books) can only hit its target share
    # to within one document; pieces make that grain fine.
    chunk_chars: int = 0

    def validate(self) -> list[tuple[str, str]]:
        if self.type not in SOURCE_TYPES:
            return [("type", f"must be one of {', '.join(SOURCE_TYPES)}, got {self.type!r}")]
        if not self.paths:
            return [("paths", "must list at least one file, directory or glob")]
        if not (self.weight > 0 and math.isfinite(self.weight)):
            return [("weight", f"must be > 0, got {self.weight}")]
        unknown = [r for r in self.rules or [] if r not in filters.RULE_GROUPS]
        if unknown:
            return [("rules", f"unknown rule group {unknown[0]!r}; known: {', '.join(filters.RULE_GROUPS)}")]
        if self.chunk_chars < 0:
            return [("chunk_chars", f"must be >= 0 (0 = keep documents whole), got {self.chunk_chars}")]
        return []


@dataclass
class DedupConfig:
    exact: bool = True
    url: bool = True
    near: bool = True
    shingle_words: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    partitions: int = 4

    def validate(self) -> list[tuple[str, str]]:
        return at_least(self, 1, "shingle_words", "bands", "rows", "partitions")


@dataclass
class MixConfig:
    enabled: bool = True  # false: every surviving train document once, weights ignored (a dedup-only run)
    total_chars: int | None = None  # size of the train mixture; None: as many characters as survived
    max_epochs: float = 4.0  # no source is repeated more often; the total shrinks instead

    def validate(self) -> list[tuple[str, str]]:
        if self.max_epochs <= 0:
            return [("max_epochs", f"must be > 0, got {self.max_epochs}")]
        if self.total_chars is not None and self.total_chars < 1:
            return [("total_chars", f"must be >= 1, got {self.total_chars}")]
        return []


@dataclass
class CrawlMixConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    filters: filters.FilterConfig = field(default_factory=filters.FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    extractor: str = "resiliparse"  # or trafilatura (pip install gptline[trafilatura])
    limits: ReadLimits = field(default_factory=ReadLimits)  # larger records and lines are skipped and counted
    validation_fraction: float = 0.05
    shard_max_chars: int = 64_000_000
    seed: int = 0

    def validate(self) -> list[tuple[str, str]]:
        if not self.sources:
            return [("sources", "define at least one source")]
        for name, source in self.sources.items():
            problems = source.validate()
            if problems:
                return [(f"sources.{name}.{problems[0][0]}", problems[0][1])]
        problems = self.limits.validate()
        if problems:
            return [(f"limits.{problems[0][0]}", problems[0][1])]
        if self.extractor not in ("resiliparse", "trafilatura"):
            return [("extractor", f"must be resiliparse or trafilatura, got {self.extractor!r}")]
        if not 0 <= self.validation_fraction < 1:
            return [("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")]
        if self.shard_max_chars < 1:
            return [("shard_max_chars", "must be >= 1")]
        return []


@dataclass
class FileJob:
    """One input file's work; also what later phases need to find its phase-1 output."""

    index: int
    source: str
    path: str
    label: str  # the path as recorded: "{input}/..." for a file inside an input artifact
    source_type: str
    text_field: str
    url_field: str
    rules: list[str]
    work: str
    filters: dict[str, Any]
    dedup: dict[str, Any]
    extractor: str
    limits: dict[str, Any]
    split_on: str = ""
    chunk_chars: int = 0


# ---- phase 1: extract, filter, key --------------------------------------------------------------------------
DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("path", pa.string()),
        ("record", pa.int64()),
        ("date", pa.string()),
        ("language", pa.string()),
        ("rank", pa.int64()),
        ("exact_key", pa.uint64()),
        ("url_key", pa.uint64()),
        ("band_keys", pa.list_(pa.uint64())),
    ]
)


def extract_and_filter(job: FileJob) -> dict[str, Any]:
    """Phase 1 for one file; idempotent (a finished file's stats are returned from disk)."""
    stats_path = Path(job.work) / "docs" / f"{job.index:06d}.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    cfg = typed(filters.FilterConfig, job.filters)
    hasher = MinHasher(job.dedup["shingle_words"], job.dedup["bands"], job.dedup["rows"], job.dedup["seed"])
    counts: Counter = Counter()
    dropped: Counter = Counter()
    languages: Counter = Counter()
    rows: dict[str, list] = {name: [] for name in DOC_SCHEMA.names}
    timings = {"extract": 0.0, "filter": 0.0, "dedup_keys": 0.0}
    bytes_in = chars_out = pii = 0
    start = time.perf_counter()
    limits = ReadLimits(**job.limits)
    documents = read_documents(job.path, job.source_type, counts, job.text_field, job.url_field, job.extractor, limits)
    for doc in _split(documents, job.split_on, job.chunk_chars):
        read_done = time.perf_counter()
        timings["extract"] += read_done - start
        bytes_in += len(doc.text.encode("utf-8", "surrogatepass"))
        text, reason, lang = filters.apply(doc.text, cfg, job.rules)
        if lang:
            languages[lang] += 1
        if reason:
            dropped[reason] += 1
            start = time.perf_counter()
            timings["filter"] += start - read_done
            continue
        if cfg.pii:
            text, replaced = filters.scrub_pii(text)
            pii += replaced
        filtered = time.perf_counter()
        timings["filter"] += filtered - read_done
        doc_id = xxhash.xxh64_hexdigest(f"{job.source}\0{doc.url}\0{text}".encode("utf-8", "surrogatepass"))
        rows["id"].append(doc_id)
        rows["text"].append(text)
        rows["source"].append(job.source)
        rows["url"].append(doc.url)
        rows["path"].append(job.label)
        rows["record"].append(doc.record)
        rows["date"].append(doc.extra)
        rows["language"].append(lang)
        rows["rank"].append((job.index << ROW_BITS) | len(rows["rank"]))
        rows["exact_key"].append(text_key(text))
        rows["url_key"].append(url_key(doc.url) if doc.url else 0)
        rows["band_keys"].append(hasher.band_keys(text))
        chars_out += len(text)
        start = time.perf_counter()
        timings["dedup_keys"] += start - filtered
    timings["extract"] += time.perf_counter() - start
    if not counts["records"] and not counts["bad_records"] and not counts["bad_files"]:
        counts["empty_files"] += 1
    _write_atomically(pa.table(rows, schema=DOC_SCHEMA), Path(job.work) / "docs" / f"{job.index:06d}.parquet")
    stats = {
        "file": job.label,
        "source": job.source,
        "counts": dict(counts),
        "dropped": dict(dropped),
        "languages": dict(languages),
        "kept": len(rows["id"]),
        "bytes_in": bytes_in,
        "chars_kept": chars_out,
        "pii_replacements": pii,
        "timings": timings,
    }
    _write_text_atomically(stats_path, json.dumps(stats))
    return stats


def _split(documents, separator: str, chunk_chars: int):
    """Documents cut at `separator`, then into pieces of about `chunk_chars` at paragraph breaks (numbered by
    piece); unchanged when neither is set."""
    for doc in documents:
        if not separator and not chunk_chars:
            yield doc
            continue
        pieces = (p for p in (doc.text.split(separator) if separator else [doc.text]) if p.strip())
        chunks = (c for p in pieces for c in _chunks(p, chunk_chars))
        for piece_no, piece in enumerate(chunks):
            yield RawDocument(piece, doc.url, doc.record * 1_000_000 + piece_no, doc.extra)


def _chunks(text: str, size: int) -> list[str]:
    """`text` in consecutive runs of whole paragraphs, each closed once it reaches `size` characters (a
    paragraph longer than `size` is a piece of its own); the whole text when size is 0."""
    if not size or len(text) <= size:
        return [text]
    out, current = [], ""
    for paragraph in text.split("\n\n"):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            out.append(current)
            current = ""
    if current.strip():
        out.append(current)
    return out


def _write_atomically(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- phase 2: dedup by key partition ------------------------------------------------------------------------
@dataclass
class PartitionJob:
    work: str
    files: int
    partition: int
    partitions: int
    kinds: list[str]


def dedup_partition(job: PartitionJob) -> dict[str, np.ndarray]:
    """Edges (survivor rank, duplicate rank) per dedup kind, for the keys that fall into this partition."""
    keys: dict[str, list[np.ndarray]] = {k: [] for k in job.kinds}
    ranks: dict[str, list[np.ndarray]] = {k: [] for k in job.kinds}
    p, n = np.uint64(job.partition), np.uint64(job.partitions)
    for index in range(job.files):
        table = pq.read_table(
            Path(job.work) / "docs" / f"{index:06d}.parquet", columns=["rank", "exact_key", "url_key", "band_keys"]
        )
        rank = table.column("rank").to_numpy()
        for kind in job.kinds:
            if kind == "near":
                bands = table.column("band_keys")
                key = pc.list_flatten(bands).to_numpy(zero_copy_only=False)
                owner = np.repeat(rank, pc.list_value_length(bands).to_numpy(zero_copy_only=False))
            else:
                key = table.column(f"{kind}_key").to_numpy()
                owner = rank
                present = key != 0  # documents without a URL have no URL key
                key, owner = key[present], owner[present]
            mine = key % n == p
            keys[kind].append(key[mine])
            ranks[kind].append(owner[mine])
    return {
        kind: group_edges(
            np.concatenate(keys[kind] or [np.empty(0, np.uint64)]),
            np.concatenate(ranks[kind] or [np.empty(0, np.int64)]),
        )
        for kind in job.kinds
    }


# ---- phases 3 and 4: split, count, mix, write --------------------------------------------------------------
@dataclass
class OutputJob:
    index: int
    source: str
    work: str
    out_dir: str
    drop: list[int]
    validation_fraction: float
    seed: int
    epochs: float = 0.0  # whole copies of every document, plus the documents whose mixing hash < threshold
    threshold: float = 0.0
    shard_max_chars: int = 0


def _survivors(job: OutputJob) -> tuple[pa.Table, np.ndarray]:
    table = pq.read_table(Path(job.work) / "docs" / f"{job.index:06d}.parquet")
    keep = ~np.isin(table.column("rank").to_numpy(), np.asarray(job.drop, dtype=np.int64))
    table = table.filter(pa.array(keep))
    is_validation = unit_hash(job.seed, "split", table.column("id").to_pylist()) < job.validation_fraction
    return table, is_validation


def count_split(job: OutputJob) -> dict[str, Any]:
    """Split sizes, and the train characters histogrammed by each document's mixing hash (see sample_threshold)."""
    table, is_validation = _survivors(job)
    chars = pc.utf8_length(table.column("text")).to_numpy(zero_copy_only=False)
    train_ids = [i for i, v in zip(table.column("id").to_pylist(), is_validation, strict=True) if not v]
    hist, _ = np.histogram(
        unit_hash(job.seed, "mix", train_ids), bins=MIX_BINS, range=(0.0, 1.0), weights=chars[~is_validation]
    )
    return {
        "train_docs": int((~is_validation).sum()),
        "train_chars": int(chars[~is_validation].sum()),
        "validation_docs": int(is_validation.sum()),
        "validation_chars": int(chars[is_validation].sum()),
        "mix_histogram": hist.astype(np.float64),
    }


def sample_threshold(histogram: np.ndarray, fraction: float) -> float:
    """The hash threshold whose documents (hash < threshold) hold closest to `fraction` of the characters.

    Every file histograms its documents' characters by mixing hash, the histograms add up per source, and the
    threshold is the bin edge where the cumulative share is nearest the target. Sampling by threshold then
    takes a prefix of one global hash order, exact to within a bin, instead of independent coin flips, whose
    error is large when a source has few, long documents (books)."""
    if fraction <= 0:
        return 0.0
    cumulative = np.concatenate([[0.0], np.cumsum(histogram)]) / max(1.0, histogram.sum())
    return float(np.argmin(np.abs(cumulative - fraction)) / (len(cumulative) - 1))


OUTPUT_COLUMNS = ["id", "text", "source", "url", "path", "record", "date", "language"]


def mix_and_write(job: OutputJob) -> dict[str, int]:
    table, is_validation = _survivors(job)
    table = table.select(OUTPUT_COLUMNS)
    written = {"train_docs": 0, "train_chars": 0}
    stem = f"{job.source}-{job.index:06d}"
    _write_shards(table.filter(pa.array(is_validation)), Path(job.out_dir) / "validation", stem, job.shard_max_chars)
    train = table.filter(pa.array(~is_validation))
    extra = unit_hash(job.seed, "mix", train.column("id").to_pylist()) < job.threshold
    copies = np.full(train.num_rows, int(job.epochs), dtype=np.int64) + extra
    order = np.repeat(np.arange(train.num_rows), copies)  # each selected document, once per copy, in file order
    copy_no = np.concatenate([np.arange(c) for c in copies]) if train.num_rows else np.empty(0, np.int64)
    mixed = train.take(pa.array(order, type=pa.int64())).append_column("copy", pa.array(copy_no, type=pa.int64()))
    _write_shards(mixed, Path(job.out_dir) / "train", stem, job.shard_max_chars)
    written["train_docs"] = mixed.num_rows
    written["train_chars"] = int(pc.sum(pc.utf8_length(mixed.column("text"))).as_py() or 0)
    return written


def _write_shards(table: pa.Table, directory: Path, stem: str, max_chars: int) -> None:
    """Consecutive rows into files of at most max_chars characters of text (at least one row each)."""
    if table.num_rows == 0:
        return
    chars = np.cumsum(pc.utf8_length(table.column("text")).to_numpy(zero_copy_only=False))
    shard_of_row = (np.concatenate([[0], chars[:-1]]) // max_chars).astype(np.int64)
    for shard_no, shard in enumerate(np.unique(shard_of_row)):
        rows = np.flatnonzero(shard_of_row == shard)
        _write_atomically(table.take(pa.array(rows)), directory / f"{stem}-{shard_no:04d}.parquet")


def mixture_epochs(chars: dict[str, int], weights: dict[str, float], cfg: MixConfig) -> tuple[dict[str, float], int]:
    """Epochs per source for the target proportions, and the resulting total characters."""
    if not cfg.enabled:
        return dict.fromkeys(chars, 1.0), sum(chars.values())
    total_weight = sum(weights.values())
    share = {s: w / total_weight for s, w in weights.items()}
    total = cfg.total_chars if cfg.total_chars is not None else sum(chars.values())
    # No source may be repeated more than max_epochs times: shrink the total until that holds.
    for source, n in chars.items():
        if share[source] * total > cfg.max_epochs * n:
            total = int(cfg.max_epochs * n / share[source])
    return {s: share[s] * total / chars[s] for s in chars}, total


# ---- the stage -----------------------------------------------------------------------------------------------
def _label(path: str, inputs: dict[str, Path]) -> str:
    """A path as the output records it: relative to the input artifact it lies in, named by the input."""
    for name, directory in inputs.items():
        with contextlib.suppress(ValueError):
            return f"{{{name}}}/{Path(path).relative_to(directory).as_posix()}"
    return path


def _file_jobs(cfg: CrawlMixConfig, inputs: dict[str, Path], work: Path) -> list[FileJob]:
    """Every input file of every source, in config order; missing paths fail here, before any work."""
    jobs: list[FileJob] = []
    filter_cfg, dedup_cfg = asdict(cfg.filters), asdict(cfg.dedup)
    for name, source in cfg.sources.items():
        patterns = [p.format(**{k: str(v) for k, v in inputs.items()}) for p in source.paths]
        extensions = [e.lower() for e in source.extensions or DEFAULT_EXTENSIONS.get(source.type, [])]
        for path in expand_paths(patterns, extensions, f"data.sources.{name}.paths"):
            jobs.append(
                FileJob(
                    index=len(jobs),
                    source=name,
                    path=path,
                    label=_label(path, inputs),
                    source_type=source.type,
                    text_field=source.text_field,
                    url_field=source.url_field,
                    rules=source.rules if source.rules is not None else DEFAULT_RULES[source.type],
                    work=str(work),
                    filters=filter_cfg,
                    dedup=dedup_cfg,
                    extractor=cfg.extractor,
                    limits=asdict(cfg.limits),
                    split_on=source.split_on,
                    chunk_chars=source.chunk_chars,
                )
            )
    return jobs


def run(cfg: CrawlMixConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    work = out_dir / "_work"
    jobs = _file_jobs(cfg, inputs, work)
    for directory in ("train", "validation"):  # phase 4 rewrites these whole on a resumed run
        shutil.rmtree(out_dir / directory, ignore_errors=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    file_stats = ctx.map(extract_and_filter, jobs, desc="extract+filter")
    timings["extract_filter_s"] = time.perf_counter() - t

    t = time.perf_counter()
    kinds = [k for k in DEDUP_KINDS if getattr(cfg.dedup, k)]
    partitions = [
        PartitionJob(str(work), len(jobs), p, cfg.dedup.partitions, kinds) for p in range(cfg.dedup.partitions)
    ]
    edges = ctx.map(dedup_partition, partitions, desc="dedup")
    removed: dict[str, set[int]] = {}
    so_far: set[int] = set()
    for i, kind in enumerate(kinds):  # attribute each removal to the first kind that finds it
        dropped = duplicates_to_drop(part[k] for part in edges for k in kinds[: i + 1])
        removed[kind] = dropped - so_far
        so_far = dropped
    timings["dedup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    output_jobs = [
        OutputJob(
            index=job.index,
            source=job.source,
            work=str(work),
            out_dir=str(out_dir),
            drop=sorted(r for r in so_far if r >> ROW_BITS == job.index),
            validation_fraction=cfg.validation_fraction,
            seed=cfg.seed,
            shard_max_chars=cfg.shard_max_chars,
        )
        for job in jobs
    ]
    split_counts = ctx.map(count_split, output_jobs, desc="split")
    stats = _source_stats(cfg, jobs, file_stats, split_counts, removed)
    empty = [name for name, s in stats.items() if s["train_chars"] == 0]
    if empty:
        name = empty[0]
        raise GptlineError(
            f"data.sources.{name}: no document survived (read {stats[name]['records']} records from "
            f"{stats[name]['files']} file(s), {stats[name]['bad_files']} unreadable; "
            f"dropped by rule: {stats[name]['dropped'] or 'none'}; "
            f"duplicates: {stats[name]['duplicates']}); fix its paths or rules, or remove the source"
        )
    epochs, total = mixture_epochs(
        {n: s["train_chars"] for n, s in stats.items()}, {n: s.weight for n, s in cfg.sources.items()}, cfg.mix
    )
    histograms = {name: np.zeros(MIX_BINS) for name in cfg.sources}
    for job, counts in zip(output_jobs, split_counts, strict=True):
        histograms[job.source] += counts["mix_histogram"]
    for job in output_jobs:
        job.epochs = epochs[job.source]
        job.threshold = sample_threshold(histograms[job.source], epochs[job.source] % 1.0)
    written = ctx.map(mix_and_write, output_jobs, desc="mix+write")
    timings["mix_write_s"] = time.perf_counter() - t
    shutil.rmtree(work)

    report = _finish_stats(cfg, stats, output_jobs, written, epochs, total, file_stats)
    (out_dir / "stats.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / "report.md").write_text(render_report(report))
    totals = report["totals"]
    for name, s in report["sources"].items():
        ctx.log({f"{name}/achieved": s["achieved_fraction"], f"{name}/target": s["target_fraction"]}, None)
    return {
        "train_docs": totals["train_docs"],
        "train_chars": totals["train_chars"],
        "validation_docs": totals["validation_docs"],
        "duplicate_rate": totals["duplicate_rate"],
        "max_mixture_error_pp": totals["max_mixture_error_pp"],
        **_timings(file_stats, timings),  # in the manifest only: the artifact's files are the same on every run
    }


def _timings(file_stats: list[dict[str, Any]], timings: dict[str, float]) -> dict[str, float]:
    phase = {k: sum(fs["timings"][k] for fs in file_stats) for k in ("extract", "filter", "dedup_keys")}
    return {**timings, "cpu_extract_s": phase["extract"], "cpu_filter_s": phase["filter"],
            "cpu_dedup_keys_s": phase["dedup_keys"], "mb_in": sum(fs["bytes_in"] for fs in file_stats) / 1e6}  # fmt: skip


def _source_stats(cfg, jobs, file_stats, split_counts, removed) -> dict[str, dict[str, Any]]:
    stats: dict[str, dict[str, Any]] = {}
    for name in cfg.sources:
        stats[name] = {
            "files": 0,
            **dict.fromkeys(COUNTED, 0),
            "bytes_in": 0,
            "after_filter": 0,
            "dropped": Counter(),
            "languages": Counter(),
            "pii_replacements": 0,
            "duplicates": dict.fromkeys(removed, 0),
            "train_docs": 0,
            "train_chars": 0,
            "validation_docs": 0,
            "validation_chars": 0,
        }
    for job, fs, sc in zip(jobs, file_stats, split_counts, strict=True):
        s = stats[job.source]
        s["files"] += 1
        for key in COUNTED:
            s[key] += fs["counts"].get(key, 0)
        s["bytes_in"] += fs["bytes_in"]
        s["after_filter"] += fs["kept"]
        s["dropped"].update(fs["dropped"])
        s["languages"].update(fs["languages"])
        s["pii_replacements"] += fs["pii_replacements"]
        for key in ("train_docs", "train_chars", "validation_docs", "validation_chars"):
            s[key] += sc[key]
        for kind, ranks in removed.items():
            s["duplicates"][kind] += sum(1 for r in ranks if r >> ROW_BITS == job.index)
    for s in stats.values():
        s["dropped"], s["languages"] = dict(s["dropped"]), dict(s["languages"])
    return stats


def _finish_stats(cfg, stats, output_jobs, written, epochs, total, file_stats) -> dict[str, Any]:
    for job, w in zip(output_jobs, written, strict=True):
        stats[job.source].setdefault("mixed_docs", 0)
        stats[job.source].setdefault("mixed_chars", 0)
        stats[job.source]["mixed_docs"] += w["train_docs"]
        stats[job.source]["mixed_chars"] += w["train_chars"]
    weight_sum = sum(s.weight for s in cfg.sources.values())
    mixed_total = sum(s["mixed_chars"] for s in stats.values())
    for name, s in stats.items():
        s["epochs"] = epochs[name]
        s["target_fraction"] = cfg.sources[name].weight / weight_sum
        s["achieved_fraction"] = s["mixed_chars"] / max(1, mixed_total)
    docs_in = sum(s["after_filter"] for s in stats.values())
    dups = sum(sum(s["duplicates"].values()) for s in stats.values())
    records = sum(fs["counts"].get("records", 0) for fs in file_stats)
    return {
        "sources": stats,
        "totals": {
            "records": records,
            "after_filter": docs_in,
            "duplicates": dups,
            "duplicate_rate": dups / max(1, docs_in),
            "train_docs": sum(s["mixed_docs"] for s in stats.values()),
            "train_chars": mixed_total,
            "target_train_chars": total,
            "validation_docs": sum(s["validation_docs"] for s in stats.values()),
            "max_mixture_error_pp": 100
            * max(abs(s["achieved_fraction"] - s["target_fraction"]) for s in stats.values()),
        },
    }


def render_report(report: dict[str, Any]) -> str:
    lines = [
        "# crawl-mix report",
        "",
        "| source | files | records | bad | after filter | duplicates (exact/url/near) "
        "| validation | train docs | epochs | target | achieved |",
        "|" + "---|" * 11,
    ]
    for name, s in report["sources"].items():
        dup = "/".join(str(s["duplicates"].get(k, 0)) for k in DEDUP_KINDS)
        lines.append(
            f"| {name} | {s['files']} | {s['records']} | {s['bad_records'] + s['bad_files']} | {s['after_filter']} "
            f"| {dup} | {s['validation_docs']} | {s['mixed_docs']} | {s['epochs']:.2f} "
            f"| {100 * s['target_fraction']:.1f}% | {100 * s['achieved_fraction']:.1f}% |"
        )
    lines += ["", "## Documents dropped by rule", ""]
    for name, s in report["sources"].items():
        rules = ", ".join(f"{rule}: {n}" for rule, n in sorted(s["dropped"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"- **{name}**: {rules or 'none'}; skipped non-HTML {s['skipped_non_html']}, "
            f"non-200 {s['skipped_status']}; languages {s['languages'] or '-'}"
        )
    t = report["totals"]
    lines += [
        "",
        f"Duplicate rate {100 * t['duplicate_rate']:.1f}%; largest mixture error "
        f"{t['max_mixture_error_pp']:.2f} percentage points.",
        "",
    ]
    return "\n".join(lines)


def report(directory: Path) -> list[dict[str, Any]]:
    """The data report: documents per source through the filters, achieved vs target mixture, what was dropped."""
    sources = json.loads((directory / "stats.json").read_text())["sources"]
    names = sorted(sources)
    dropped = [[name, reason, count] for name in names for reason, count in sorted(sources[name]["dropped"].items())]
    duplicates = [[name, kind, count] for name in names for kind, count in sorted(sources[name]["duplicates"].items())
                  if count]  # fmt: skip
    return [
        {"kind": "bars", "title": "documents per source", "categories": names, "y_label": "documents",
         "series": {key: [sources[n][key] for n in names] for key in ("records", "after_filter", "train_docs")}},
        {"kind": "bars", "title": "mixture: target vs achieved (share of training characters)", "categories": names,
         "series": {"target": [sources[n]["target_fraction"] for n in names],
                    "achieved": [sources[n]["achieved_fraction"] for n in names]}},
        {"kind": "table", "title": "filter drops", "columns": ["source", "filter", "documents"], "rows": dropped},
        {"kind": "table", "title": "duplicates removed", "columns": ["source", "kind", "documents"],
         "rows": duplicates},
    ]  # fmt: skip
