"""crawl-mix end to end at small scale: real WARCs, damaged inputs, dedup, mixture accuracy, determinism."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import typed
from pipeline.dag import StageContext
from pipeline.errors import GptlineError
from stages.crawl_mix import CrawlMixConfig, run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WARC_DIR = SHARED / "warc"
VOCAB = [f"w{i}" for i in range(5000)]


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder beside the checkout)")
    return path


def crawl_mix(tmp_path: Path, sources: dict, **extra) -> tuple[dict, Path]:
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    cfg = typed(CrawlMixConfig, {"sources": sources, **extra})
    metrics = run(cfg, {}, out, StageContext("crawl_mix"))
    return {"metrics": metrics, **json.loads((out / "stats.json").read_text())}, out


def random_docs(rng: np.random.Generator, n: int, words: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(VOCAB, rng.integers(*words))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], urls: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "url": (urls or [""] * len(texts))[i]}) + "\n")
    return path


def read_output(out: Path, split: str = "train"):
    files = sorted((out / split).glob("*.parquet"))
    return pq.read_table([str(f) for f in files]) if files else None


def test_real_warc_files_including_malformed_ones(tmp_path):
    needs(WARC_DIR)
    stats, out = crawl_mix(tmp_path, {"web": {"type": "warc", "paths": [str(WARC_DIR)]}}, validation_fraction=0.0)
    web = stats["sources"]["web"]
    assert web["files"] == 20  # every WARC/ARC file, the malformed, non-chunked and truncated ones included
    assert web["skipped_non_html"] > 0 and web["skipped_status"] >= 1
    assert web["after_filter"] >= 20 and sum(web["dropped"].values()) > 0
    # warcio's example page is in a dozen of its files (WARC, ARC, gzip per record or not, chunked or not, with
    # broken chunking): each is read, and all but one copy go as exact duplicates (unfiltered: it is short).
    unfiltered, _ = crawl_mix(tmp_path / "unfiltered", {"web": {"type": "warc", "paths": [str(WARC_DIR)], "rules": []}})
    assert unfiltered["sources"]["web"]["duplicates"]["exact"] >= 8
    table = read_output(out)
    urls = table.column("url").to_pylist()
    assert all(u.startswith("http") and not u.startswith("<") for u in urls)  # the <...> target-URI quirk
    assert any("semanticscholar.org" in u for u in urls)
    assert set(table.column_names) >= {"id", "text", "source", "url", "path", "record", "date", "language", "copy"}


def test_damaged_and_odd_inputs_are_counted_not_fatal(tmp_path):
    warc = needs(WARC_DIR / "dolma-sample-0000.warc.gz").read_bytes()
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "truncated.warc.gz").write_bytes(warc[: len(warc) // 2])
    (tmp_path / "web" / "empty.warc.gz").write_bytes(b"")
    (tmp_path / "web" / "garbage.warc").write_bytes(b"\x00\xffnot a warc at all\n" * 50)
    rng = np.random.default_rng(0)
    good = random_docs(rng, 5, (80, 120))
    lines = [json.dumps({"text": t}) for t in good] + ["{broken json", json.dumps({"text": 42}), json.dumps({"x": 1})]
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "jsonl" / "empty.jsonl").write_text("")
    with gzip.open(tmp_path / "jsonl" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[:3]) + "\n")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "latin1.txt").write_bytes(("Café déjà vu, naïve façade. " * 40).encode("latin-1"))
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "ok.py").write_text("def f(x):\n    return x + 1\n" * 5)
    (tmp_path / "code" / "binary.py").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    stats, out = crawl_mix(
        tmp_path,
        {
            "web": {"type": "warc", "paths": [str(tmp_path / "web")], "rules": []},
            "jsonl": {"type": "jsonl", "paths": [str(tmp_path / "jsonl")], "rules": []},
            "books": {"type": "text", "paths": [str(tmp_path / "books")], "rules": []},
            "code": {"type": "code", "paths": [str(tmp_path / "code")]},
        },
        validation_fraction=0.0,
        mix={"enabled": False},
    )
    s = stats["sources"]
    assert s["web"]["files"] == 3 and s["web"]["truncated_files"] == 1 and s["web"]["empty_files"] == 1
    assert s["web"]["after_filter"] >= 5 and s["web"]["bad_records"] >= 1
    assert s["jsonl"]["files"] == 3 and s["jsonl"]["bad_records"] == 3 and s["jsonl"]["after_filter"] == 8
    assert s["books"]["after_filter"] == 1 and s["code"]["bad_records"] == 1 and s["code"]["after_filter"] == 1
    output = read_output(out)
    books = [
        t
        for t, src in zip(output.column("text").to_pylist(), output.column("source").to_pylist(), strict=True)
        if src == "books"
    ]
    assert "Café déjà vu" in books[0]  # latin-1 detected and decoded


def test_missing_path_fails_before_any_work(tmp_path):
    (tmp_path / "real.warc").write_bytes(b"")
    with pytest.raises(GptlineError, match=r"data.sources.web.paths\[1\]: no file matches .*nowhere"):
        crawl_mix(
            tmp_path,
            {"web": {"type": "warc", "paths": [str(tmp_path / "real.warc"), str(tmp_path / "nowhere/*.warc")]}},
        )
    assert not (tmp_path / "out" / "_work").exists()


def test_a_source_with_no_survivors_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", random_docs(np.random.default_rng(1), 20, (80, 100)))
    write_jsonl(tmp_path / "tiny.jsonl", ["too short", "also short"])
    with pytest.raises(GptlineError, match=r"data.sources.tiny: no document survived .*gopher_min_words': 2"):
        crawl_mix(
            tmp_path,
            {
                "ok": {"type": "jsonl", "paths": [str(tmp_path / "ok.jsonl")], "rules": []},
                "tiny": {"type": "jsonl", "paths": [str(tmp_path / "tiny.jsonl")], "rules": ["gopher_quality"]},
            },
        )


def edit_clustered(text: str, fraction: float, rng: np.random.Generator, spans: int = 3) -> str:
    """Change `fraction` of the words in a few contiguous runs, as real near-duplicates differ (a changed
    sentence, a date, a name), not as independent coin flips."""
    words = text.split()
    per_span = max(1, round(len(words) * fraction / spans))
    for start in rng.choice(len(words) - per_span, spans, replace=False):
        words[start : start + per_span] = [f"edit{rng.integers(10**6)}" for _ in range(per_span)]
    return " ".join(words)


def test_near_and_exact_duplicates_are_removed_and_distinct_documents_survive(tmp_path):
    rng = np.random.default_rng(7)
    originals = random_docs(rng, 200, (300, 500))
    near = [edit_clustered(t, 0.05, rng) for t in originals[:20]]
    write_jsonl(tmp_path / "a" / "docs.jsonl", originals + near)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "copy.txt").write_text(originals[30].upper())  # same text after normalization
    (tmp_path / "b" / "own.txt").write_text(random_docs(rng, 1, (300, 301))[0])
    stats, out = crawl_mix(
        tmp_path,
        {
            "a": {"type": "jsonl", "paths": [str(tmp_path / "a")], "rules": []},
            "b": {"type": "text", "paths": [str(tmp_path / "b")], "rules": []},
        },
        validation_fraction=0.0,
        mix={"enabled": False},
    )
    dups_a, dups_b = stats["sources"]["a"]["duplicates"], stats["sources"]["b"]["duplicates"]
    assert dups_b == {"exact": 1, "url": 0, "near": 0}  # the later source's copy goes, once
    assert dups_a["exact"] == 0 and dups_a["near"] >= 19  # >= 19 of the 20 near copies (J ~ 0.85)
    texts = set(read_output(out).column("text").to_pylist())
    assert all(t in texts for t in originals)  # every distinct original survives (the first copy wins)
    assert originals[30].upper() not in texts


def test_mixture_proportions_within_two_points_with_up_and_down_sampling(tmp_path):
    rng = np.random.default_rng(3)
    sources = {}
    for name, n, words in (("big", 600, (50, 400)), ("mid", 300, (100, 200)), ("small", 40, (50, 150))):
        write_jsonl(tmp_path / f"{name}.jsonl", random_docs(rng, n, words))
        sources[name] = {"type": "jsonl", "paths": [str(tmp_path / f"{name}.jsonl")], "rules": []}
    sources["big"]["weight"], sources["mid"]["weight"], sources["small"]["weight"] = 0.5, 0.3, 0.2
    stats, out = crawl_mix(tmp_path, sources, validation_fraction=0.05)
    s = stats["sources"]
    assert s["small"]["epochs"] > 1 and s["big"]["epochs"] < 1  # up- and down-sampling both happen
    for name, source in s.items():
        assert abs(source["achieved_fraction"] - source["target_fraction"]) < 0.02, name
    assert stats["metrics"]["max_mixture_error_pp"] < 2
    train = read_output(out)
    assert max(train.column("copy").to_pylist()) >= 1
    validation_ids = set(read_output(out, "validation").column("id").to_pylist())
    assert validation_ids and not validation_ids & set(train.column("id").to_pylist())  # split by document


def test_long_documents_cut_into_paragraph_pieces_let_a_few_books_hit_their_share(tmp_path):
    rng = np.random.default_rng(7)
    books = tmp_path / "books"
    books.mkdir()
    originals = []
    for i in range(6):  # six books of ~60k characters, each a big fraction of the mixture
        text = "\n\n".join(" ".join(rng.choice(VOCAB, rng.integers(20, 120))) for _ in range(200))
        (books / f"book{i}.txt").write_text(text)
        originals.append(text)
    write_jsonl(tmp_path / "web.jsonl", random_docs(rng, 400, (50, 300)))

    def mixture(chunk_chars: int):
        sources = {
            "books": {"type": "text", "paths": [str(books)], "weight": 0.23, "rules": [], "chunk_chars": chunk_chars},
            "web": {"type": "jsonl", "paths": [str(tmp_path / "web.jsonl")], "weight": 0.77, "rules": []},
        }
        return crawl_mix(tmp_path / f"chunk{chunk_chars}", sources, validation_fraction=0.0)

    whole, _ = mixture(0)
    pieces, out = mixture(5000)
    assert whole["sources"]["books"]["after_filter"] == 6 and pieces["sources"]["books"]["after_filter"] > 60
    error = {name: abs(s["achieved_fraction"] - s["target_fraction"]) for name, s in pieces["sources"].items()}
    assert max(error.values()) < 0.005 < abs(whole["sources"]["books"]["achieved_fraction"] - 0.23)
    # every piece is a run of whole paragraphs of one book, in order; together they are the book again
    train = read_output(out)
    by_book: dict[str, dict[str, str]] = {}
    for row in train.filter(pc.equal(train.column("source"), "books")).to_pylist():
        by_book.setdefault(row["path"], {})[row["id"]] = row["text"]
    for path, texts in by_book.items():
        book = originals[int(Path(path).stem.removeprefix("book"))]
        assert all(t in book and not t.startswith("\n") for t in texts.values())
        assert all(len(t) >= 5000 or book.endswith(t) for t in texts.values())


def test_same_inputs_and_seed_give_byte_identical_shards(tmp_path):
    needs(WARC_DIR)
    rng = np.random.default_rng(5)
    write_jsonl(tmp_path / "docs.jsonl", random_docs(rng, 300, (50, 300)))
    sources = {
        "web": {"type": "warc", "paths": [str(WARC_DIR / "dolma-sample-*.warc.gz")], "weight": 0.3},
        "docs": {"type": "jsonl", "paths": [str(tmp_path / "docs.jsonl")], "weight": 0.7, "rules": []},
    }
    outputs = []
    for attempt in ("first", "second"):
        _, out = crawl_mix(tmp_path / attempt, sources, shard_max_chars=20_000)
        outputs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.parquet"))})
    assert len(outputs[0]) > 4 and outputs[0] == outputs[1]
    _, other = crawl_mix(tmp_path / "reseeded", sources, shard_max_chars=20_000, seed=1)
    assert {p.relative_to(other): p.read_bytes() for p in sorted(other.rglob("*.parquet"))} != outputs[0]


def test_under_the_runner_the_fan_out_runs_as_ray_tasks_and_matches_a_standalone_run(tmp_path, ray_session):
    """The real registry (fetch=none, crawl_mix) through the CLI on Ray gives the same shards as the plain call."""
    from gptline.cli.main import main
    from pipeline.artifacts import Store

    write_jsonl(tmp_path / "docs.jsonl", random_docs(np.random.default_rng(11), 200, (50, 300)))
    sources = {
        "web": {"type": "warc", "paths": [str(needs(WARC_DIR / "dolma-sample-0000.warc.gz"))], "weight": 0.5},
        "docs": {"type": "jsonl", "paths": [str(tmp_path / "docs.jsonl")], "weight": 0.5, "rules": []},
    }
    conf = tmp_path / "conf"
    conf.mkdir()
    root = {"defaults": ["gptline_schema", {"cluster": "local"}, {"tracking": "offline"}, {"fetch": "none"}, "_self_"]}
    (conf / "config.yaml").write_text(json.dumps({**root, "data": {"sources": sources, "dedup": {"partitions": 3}}}))
    store = tmp_path / "store"
    args = ["run", "--config-dir", str(conf), f"store.root={store}", "tracking=disabled", "--until", "crawl_mix"]
    assert main(args) == 0
    [artifact] = Store(str(store)).list("crawl_mix")
    assert artifact.manifest["metrics"]["train_docs"] > 0
    assert artifact.inputs.keys() == {"fetch"}
    _, standalone = crawl_mix(tmp_path / "standalone", sources, dedup={"partitions": 3})
    shards = {p.relative_to(standalone): p.read_bytes() for p in standalone.rglob("*.parquet")}
    committed = Path(artifact.path)
    assert shards and {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*.parquet")} == shards
    assert not (committed / "_work").exists()


def test_a_warc_source_added_from_the_command_line_alone_runs_and_is_reported_by_its_name(tmp_path, ray_session):
    from gptline.cli.main import main
    from pipeline.artifacts import Store
    from pipeline.config import compose_config
    from pipeline.dag import DAG
    from stages import REGISTRY, crawl_mix

    warc = str(needs(WARC_DIR / "dolma-sample-0000.warc.gz"))
    drop = [f"~data.sources.{name}" for name in ("web", "wikipedia", "books", "code", "qa")]
    added = ["+data.sources.mycrawl.type=warc", f"+data.sources.mycrawl.paths=[{warc}]"]
    as_dict = [f"+data.sources.mycrawl={{type: warc, paths: [{warc}]}}"]

    def version(overrides: list[str]) -> str:
        config = compose_config(REGISTRY, ["fetch=none", *drop, *overrides])
        return DAG(REGISTRY).versions({s.key: config[s.key] for s in REGISTRY}, ["crawl_mix"])["crawl_mix"]

    assert version(added) == version(as_dict) != version([*added, "data.sources.mycrawl.weight=2"])
    store = tmp_path / "store"
    assert main(["run", f"store.root={store}", "tracking=disabled", "fetch=none", *drop, *added,
                 "--until", "crawl_mix"]) == 0  # fmt: skip
    [artifact] = Store(str(store)).list("crawl_mix")
    [per_source, *_] = crawl_mix.report(Path(artifact.path))
    assert per_source["categories"] == ["mycrawl"] and per_source["series"]["train_docs"][0] > 0
    [run_dir] = (store / "runs").iterdir()
    assert "mycrawl" in (run_dir / "report.html").read_text()


def test_llama_mixture_config_encodes_the_paper_proportions():
    from pipeline.config import DEFAULT_CONFIG_DIR, compose_config
    from stages import REGISTRY

    config = compose_config(REGISTRY, ["data=llama", "fetch=none"], DEFAULT_CONFIG_DIR)
    weights = {name: source["weight"] for name, source in config["data"]["sources"].items()}
    assert weights == {
        "commoncrawl": 0.670,
        "c4": 0.150,
        "github": 0.045,
        "wikipedia": 0.045,
        "books": 0.045,
        "arxiv": 0.025,
        "stackexchange": 0.020,
    }
    assert config["fetch"]["archives"] == {} and not config["fetch"]["crawl"]["enabled"]
