"""The run report: one self-contained HTML file with the status, the lineage graph, each stage's charts and tables;
and, in headless Chromium, the charts really drawn (a screenshot holds their colours)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import report
from tests.conftest import REGISTRY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, out: Path, height: int = 4000) -> Path:
    """A PNG of the page as headless Chromium renders it (Debian's `chromium`)."""
    if CHROMIUM is None:
        if os.environ.get("GPTLINE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (GPTLINE_REQUIRE_CHROMIUM is set) but not installed: `make chromium`")
        pytest.skip("chromium is not installed (`make chromium` installs Debian's package)")
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1280,{height}", f"--screenshot={out}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    return out


def colour_pixels(png: Path, colour: str, tolerance: int = 40) -> int:
    """How many pixels of the screenshot are within `tolerance` (per channel) of the colour."""
    from PIL import Image

    target = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    image = Image.open(png).convert("RGB")
    return sum(
        count
        for count, rgb in image.getcolors(maxcolors=1 << 24)
        if all(abs(a - b) <= tolerance for a, b in zip(rgb, target, strict=True))
    )


def run_report(pipeline) -> Path:
    assert pipeline.run() == 0
    out = pipeline.capsys.readouterr().out
    line = [line for line in out.splitlines() if line.startswith("report:")][-1]
    path = Path(line.split(maxsplit=1)[1])
    assert path == pipeline.store / "runs" / pipeline.latest_run() / "report.html"
    return path


def test_a_run_ends_with_a_self_contained_report(pipeline):
    page = run_report(pipeline).read_text()
    for stage in ("numbers", "squares", "evens", "total"):
        assert f'<h2 id="{stage}">' in page
    assert page.count("<svg") == 3  # the lineage graph and the numbers stage's two charts
    assert "<polyline" in page and "<rect" in page and 'marker-end="url(#arrow)"' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page
    assert not re.search(r'(src|href)="https?://', page)  # nothing fetched from the network
    # `gptline report` writes the same page again for the newest run.
    assert pipeline.cli("report", "--registry", REGISTRY) == 0
    assert pipeline.capsys.readouterr().out.strip().endswith("report.html")


def test_a_reused_artifact_says_which_run_built_it(pipeline):
    assert pipeline.run() == 0
    first = pipeline.latest_run()
    page = run_report(pipeline).read_text()
    assert f"reused from run {first}" in page


def test_charts_skip_non_finite_points_and_reject_unknown_kinds():
    svg = report.line_chart({"title": "t", "series": {"a": [[0, 1.0], [1, float("nan")], [2, 3.0]]}})
    assert svg.count(",") >= 2 and "nan" not in svg
    assert "no data" in report.line_chart({"title": "empty", "series": {"a": [[0, float("inf")]]}})
    with pytest.raises(ValueError, match="unknown kind 'pie'"):
        report.render_sections([{"kind": "pie", "title": "x"}])
    assert report.ticks(0, 1) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert report.tick_label(250000) == "250k" and report.tick_label(1.5e6) == "1.5M"


def test_screenshot_shows_the_charts_drawn(pipeline, tmp_path):
    png = screenshot(run_report(pipeline), tmp_path / "report.png", height=2000)
    blue, red = (colour_pixels(png, c) for c in report.PALETTE[:2])
    assert blue > 2000, blue  # the histogram's bars and the running mean's line
    assert red > 0, red  # the second series' point


def test_on_an_object_store_the_report_reads_only_small_files_and_a_raising_hook_becomes_a_note(s3_store, tmp_path):
    from pipeline.artifacts import Store
    from pipeline.dag import DAG, StageSpec
    from pipeline.runner import RunRecord
    from tests.parquet_stages import NumbersConfig, SquaresConfig, numbers, squares

    def shows_stats(directory: Path) -> list[dict]:
        return [
            {"kind": "table", "title": "stats", "columns": ["n"], "rows": [[(directory / "stats.json").read_text()]]}
        ]

    def raises(directory: Path) -> list[dict]:
        raise RuntimeError("a hook bug")

    dag = DAG([StageSpec("numbers", numbers, NumbersConfig, report=shows_stats),
               StageSpec("squares", squares, SquaresConfig, inputs=("numbers",), report=raises)])  # fmt: skip
    store, scratch = Store(s3_store), tmp_path / "scratch"
    for stage, version in (("numbers", "0" * 12), ("squares", "1" * 12)):
        work = tmp_path / stage
        work.mkdir()
        (work / "stats.json").write_text("4242")
        (work / "weights.bin").write_bytes(b"\0" * (report.REPORT_FILE_MAX_BYTES + 1))
        store.commit(stage, version, work, {"run_id": "r1", "metrics": {}})
    record = RunRecord(store, "r1", scratch)
    record.write_meta({"run_id": "r1", "status": "done", "nodes": [["numbers", "0" * 12], ["squares", "1" * 12]]})
    for stage, version in (("numbers", "0" * 12), ("squares", "1" * 12)):
        record.set_node(stage, state="done", version=version)
    report.write_report(store, dag, "r1", scratch)
    with store.fs.open_input_stream(f"{record.path}/report.html") as f:
        page = f.read().decode()
    assert "4242" in page and "RuntimeError: a hook bug" in page
    assert not list(scratch.rglob("weights.bin")) and list(scratch.rglob("stats.json"))
