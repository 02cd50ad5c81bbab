"""The pydoc crawl: the same bytes on every run, and nothing of the process that ran it in the pages."""

from __future__ import annotations

import gzip
from pathlib import Path

from pipeline.artifacts import sha256_file
from stages.fetch import CANONICAL_HOST, CrawlConfig, crawl_pydoc


def crawl(out: Path, **cfg) -> dict[str, str]:
    out.mkdir()
    crawl_pydoc(CrawlConfig(**cfg), out)
    return {p.name: sha256_file(p) for p in sorted(out.iterdir())}


def test_two_crawls_give_the_same_warc_bytes_under_the_canonical_host(tmp_path):
    first = crawl(tmp_path / "a", max_pages=30, pages_per_warc=10)
    assert len(first) == 3 and first == crawl(tmp_path / "b", max_pages=30, pages_per_warc=10)
    text = gzip.decompress((tmp_path / "a" / "crawl-00000.warc.gz").read_bytes()).decode("utf-8", "replace")
    assert f"WARC-Target-URI: http://{CANONICAL_HOST}/topics.html" in text and "127.0.0.1" not in text


def test_the_servers_environment_and_command_line_are_not_crawled(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLINE_TEST_SECRET", "do-not-crawl-me")
    crawl(tmp_path / "out", seeds=["/os.html", "/sys.html"], max_pages=2)
    text = gzip.decompress((tmp_path / "out" / "crawl-00000.warc.gz").read_bytes()).decode("utf-8", "replace")
    assert "environ</strong>" in text and "argv</strong> = ['pydoc']" in text
    assert "do-not-crawl-me" not in text and "GPTLINE_TEST_SECRET" not in text
