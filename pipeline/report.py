"""`gptline report [RUN_ID]`: one self-contained HTML file per run, at `runs/<run_id>/report.html` in the store.

The page holds the run's status table, the lineage graph of its artifacts (an SVG: one box per stage with its
version and state, an arrow per input), and one section per stage: where its artifact came from (built by this run
or reused from which), its inputs' versions, its metrics, and what the stage itself chooses to show. A stage shows
things through its spec's `report` hook, `report(artifact_dir) -> list[section]`, where a section is plain data:

- `{"kind": "lines", "title", "series": {name: [[x, y], ...]}, "x_label", "y_label"}`: a line chart;
- `{"kind": "bars", "title", "categories": [...], "series": {name: [value per category]}, "y_label"}`: grouped bars;
- `{"kind": "table", "title", "columns": [...], "rows": [[...], ...]}`;

so this module draws charts without knowing what they mean, and the stages know nothing about HTML. Charts are
inline SVG (no script, no network: the file opens anywhere, offline, and prints). The composed config closes the
page.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import Store
from pipeline.dag import DAG
from pipeline.runner import RunRecord, as_built

REPORT = "report.html"
REPORT_FILE_MAX_BYTES = 8 << 20  # what a report hook may read from an object store; larger files stay there
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
STATE_COLORS = {"done": "#cde8cf", "reused": "#d3e3f4", "failed": "#f6c9c9", "running": "#fbe3c0"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1240px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 14px 0 4px; }
table { border-collapse: collapse; margin: 6px 0 12px; } td, th { border: 1px solid #ddd; padding: 3px 8px;
  vertical-align: top; text-align: left; } th { background: #f4f4f4; } td.num { text-align: right;
  font-variant-numeric: tabular-nums; } .charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { border: 1px solid #e4e4e4; } .muted { color: #777; } pre { background: #f7f7f7; padding: 8px;
  overflow-x: auto; font-size: 12px; } .lineage { overflow-x: auto; }
"""


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def esc(value: Any) -> str:
    return html.escape(fmt(value))


def tick_label(value: float) -> str:
    """Axis numbers stay short: 250k, 1.2M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}" if suffix != "k" else f"{value / 1e3:.3g}k"
    return f"{value:.4g}"


# ---- charts --------------------------------------------------------------------------------------------------
def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round numbers spanning [low, high]."""
    step = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step) if step > 0 else 1
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


class Frame:
    """An SVG chart's plotting area with axes from data ranges to pixels."""

    W, H, LEFT, RIGHT, TOP, BOTTOM = 540, 270, 62, 14, 30, 42

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]):
        (self.x0, self.x1), (self.y0, self.y1) = (self._widen(*x_range), self._widen(*y_range, pad=0.05))

    @staticmethod
    def _widen(low: float, high: float, pad: float = 0.0) -> tuple[float, float]:
        if high - low < 1e-12:
            return low - 1, high + 1
        return low - pad * (high - low), high + pad * (high - low)

    def x(self, value: float) -> float:
        return self.LEFT + (value - self.x0) / (self.x1 - self.x0) * (self.W - self.LEFT - self.RIGHT)

    def y(self, value: float) -> float:
        return self.H - self.BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (self.H - self.TOP - self.BOTTOM)

    def axes(self, title: str, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
        parts = [f'<rect x="0" y="0" width="{self.W}" height="{self.H}" fill="#fff"/>',
                 f'<text x="{self.W / 2}" y="18" text-anchor="middle" font-weight="600">{esc(title)}</text>']  # fmt: skip
        bottom, left = self.H - self.BOTTOM, self.LEFT
        for value in ticks(self.y0, self.y1):
            y = self.y(value)
            parts.append(f'<line x1="{left}" x2="{self.W - self.RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            parts.append(
                f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick_label(value)}</text>'
            )
        if x_ticks:
            for value in ticks(self.x0, self.x1):
                x = self.x(value)
                parts.append(f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle" font-size="11">'
                             f"{tick_label(value)}</text>")  # fmt: skip
        parts.append(f'<line x1="{left}" x2="{left}" y1="{self.TOP}" y2="{bottom}" stroke="#888"/>')
        parts.append(f'<line x1="{left}" x2="{self.W - self.RIGHT}" y1="{bottom}" y2="{bottom}" stroke="#888"/>')
        parts.append(f'<text x="{self.W / 2}" y="{self.H - 6}" text-anchor="middle" font-size="12">'
                     f"{esc(x_label)}</text>")  # fmt: skip
        parts.append(f'<text transform="translate(14 {self.H / 2}) rotate(-90)" text-anchor="middle" '
                     f'font-size="12">{esc(y_label)}</text>')  # fmt: skip
        return parts

    def legend(self, names: Sequence[str]) -> list[str]:
        parts = []
        for i, name in enumerate(names):
            x, y = self.LEFT + 8 + 120 * (i % 4), self.TOP + 4 + 14 * (i // 4)
            color = PALETTE[i % len(PALETTE)]
            parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{x + 14}" y="{y + 9}" font-size="11">{esc(name)}</text>')  # fmt: skip
        return parts

    def svg(self, parts: list[str]) -> str:
        return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{self.W}" height="{self.H}" '
                f'font-family="sans-serif">{"".join(parts)}</svg>')  # fmt: skip


def finite_points(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points
            if isinstance(y, int | float) and math.isfinite(x) and math.isfinite(y)]  # fmt: skip


def line_chart(section: Mapping[str, Any]) -> str:
    series = {name: finite_points(points) for name, points in section["series"].items()}
    points = [p for s in series.values() for p in s]
    if not points:
        return f'<p class="muted">{esc(section["title"])}: no data</p>'
    frame = Frame((min(x for x, _ in points), max(x for x, _ in points)),
                  (min(y for _, y in points), max(y for _, y in points)))  # fmt: skip
    parts = frame.axes(section["title"], section.get("x_label", "step"), section.get("y_label", ""))
    for i, (_, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            parts.append(f'<circle cx="{frame.x(pts[0][0]):.1f}" cy="{frame.y(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
    if len(series) > 1:
        parts += frame.legend(list(series))
    return frame.svg(parts)


def bar_chart(section: Mapping[str, Any]) -> str:
    categories, series = list(section["categories"]), dict(section["series"])
    values = [float(v) for vs in series.values() for v in vs if math.isfinite(float(v))]
    if not categories or not values:
        return f'<p class="muted">{esc(section["title"])}: no data</p>'
    frame = Frame((0, len(categories)), (min(0.0, *values), max(0.0, *values)))
    frame.x0, frame.x1 = 0, len(categories)  # bars fill the width exactly
    parts = frame.axes(section["title"], section.get("x_label", ""), section.get("y_label", ""), x_ticks=False)
    slot = (frame.x(1) - frame.x(0)) * 0.8 / max(len(series), 1)
    zero = frame.y(0)
    for c, category in enumerate(categories):
        for s, (_, vs) in enumerate(series.items()):
            value = float(vs[c])
            if not math.isfinite(value):
                continue
            x, y = frame.x(c) + (frame.x(1) - frame.x(0)) * 0.1 + s * slot, frame.y(value)
            parts.append(f'<rect x="{x:.1f}" y="{min(y, zero):.1f}" width="{slot * 0.92:.1f}" '
                         f'height="{abs(zero - y):.1f}" fill="{PALETTE[s % len(PALETTE)]}"/>')  # fmt: skip
        parts.append(f'<text x="{frame.x(c + 0.5):.1f}" y="{frame.H - frame.BOTTOM + 14}" text-anchor="middle" '
                     f'font-size="11">{esc(category)}</text>')  # fmt: skip
    if len(series) > 1:
        parts += frame.legend(list(series))
    return frame.svg(parts)


def table(section: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in section["columns"])
    rows = []
    for row in section["rows"]:
        cells = "".join(f'<td class="num">{esc(v)}</td>' if isinstance(v, int | float) and not isinstance(v, bool)
                        else f"<td>{esc(v)}</td>" for v in row)  # fmt: skip
        rows.append(f"<tr>{cells}</tr>")
    title = f"<h3>{esc(section['title'])}</h3>" if section.get("title") else ""
    return f"{title}<table><tr>{head}</tr>{''.join(rows)}</table>"


RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {"lines": line_chart, "bars": bar_chart, "table": table}


def render_sections(sections: Sequence[Mapping[str, Any]]) -> str:
    """Charts side by side in a wrapping row, tables below them."""
    charts, tables = [], []
    for section in sections:
        kind = section.get("kind")
        if kind not in RENDERERS:
            raise ValueError(f"report section {section.get('title')!r} has unknown kind {kind!r}")
        (tables if kind == "table" else charts).append(RENDERERS[kind](section))
    return (f'<div class="charts">{"".join(charts)}</div>' if charts else "") + "".join(tables)


# ---- the lineage graph ---------------------------------------------------------------------------------------
def lineage_svg(nodes: Sequence[tuple[str, str, str]], inputs: Mapping[str, Sequence[str]]) -> str:
    """(stage, version, state) boxes in columns by depth, an arrow from each input; long edges arc above."""
    depth: dict[str, int] = {}
    for stage, _, _ in nodes:  # nodes come in topological order
        depth[stage] = 1 + max((depth[d] for d in inputs.get(stage, ()) if d in depth), default=-1)
    rows: dict[int, int] = {}
    place: dict[str, tuple[float, float]] = {}
    box_w, box_h, gap_x, gap_y, lift_per_layer = 116, 44, 22, 22, 22
    longest = max((depth[s] - depth[d] for s in depth for d in inputs.get(s, ()) if d in depth), default=1)
    top = 10 + 0.75 * 1.6 * lift_per_layer * max(longest - 1, 0)  # a cubic arc rises 3/4 of its control offset
    for stage, _, _ in nodes:
        row = rows.get(depth[stage], 0)
        rows[depth[stage]] = row + 1
        place[stage] = (10 + depth[stage] * (box_w + gap_x), top + row * (box_h + gap_y))
    width = 20 + (max(depth.values(), default=0) + 1) * (box_w + gap_x)
    height = top + max(rows.values(), default=1) * (box_h + gap_y) + 10
    parts = ['<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>']  # fmt: skip
    for stage, _, _ in nodes:
        for dep in inputs.get(stage, ()):
            if dep not in place:
                continue
            (x1, y1), (x2, y2) = place[dep], place[stage]
            x1, y1, y2 = x1 + box_w, y1 + box_h / 2, y2 + box_h / 2
            lift = lift_per_layer * (depth[stage] - depth[dep] - 1)
            parts.append(f'<path d="M{x1},{y1} C{x1 + 40},{y1 - lift * 1.6} {x2 - 40},{y2 - lift * 1.6} {x2},{y2}" '
                         f'fill="none" stroke="#999" marker-end="url(#arrow)"/>')  # fmt: skip
    for stage, version, state in nodes:
        x, y = place[stage]
        fill = STATE_COLORS.get(state, "#eee")
        parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="{fill}" stroke="#888"/>'
                     f'<text x="{x + box_w / 2}" y="{y + 18}" text-anchor="middle" font-weight="600">{esc(stage)}'
                     f'</text><text x="{x + box_w / 2}" y="{y + 35}" text-anchor="middle" font-size="11" '
                     f'font-family="monospace">{esc(version)} · {esc(state)}</text>')  # fmt: skip
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif">{"".join(parts)}</svg>')  # fmt: skip


# ---- the page ------------------------------------------------------------------------------------------------
def metrics_table(metrics: Mapping[str, Any]) -> str:
    rows = [[k, v] for k, v in metrics.items() if isinstance(v, int | float | str)]
    return table({"columns": ["metric", "value"], "rows": rows}) if rows else ""


def build_html(store: Store, dag: DAG, run_id: str, scratch: Path) -> str:
    record = RunRecord(store, run_id, scratch)
    meta = record.meta()
    nodes = [(stage, version, record.node(stage)) for stage, version in meta.get("nodes", [])]
    summary_rows, sections = [], []
    for stage, version, node in nodes:
        node = as_built(store, stage, version, node)
        state = node.get("state", "pending")
        metrics = node.get("metrics") or {}
        headline = [k for k in node.get("headline", []) if k in metrics][:4]
        summary_rows.append([stage, version, state, f"{node['seconds']:.1f} s" if node.get("seconds") else "",
                             " ".join(f"{k}={fmt(metrics[k])}" for k in headline)])  # fmt: skip
        sections.append(stage_section(store, dag, stage, version, node, scratch))
    try:
        recorded = record.config()
        config = json.dumps(recorded, indent=2)
    except (FileNotFoundError, OSError):
        recorded, config = {}, "(no config recorded)"
    lineage = lineage_svg([(s, v, n.get("state", "pending")) for s, v, n in nodes],
                          {s: dag.specs[s].input_stages(recorded) for s, _, _ in nodes if s in dag})  # fmt: skip
    overrides = " ".join(meta.get("overrides", [])) or "(none)"
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("created", 0)))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gptline run {esc(run_id)}</title><style>{CSS}</style></head>
<body>
<h1>gptline run {esc(run_id)}: {esc(meta.get("status", "?"))}</h1>
<p class="muted">started {esc(created)} on {esc(meta.get("driver_host", "?"))} · overrides: {esc(overrides)} ·
store {esc(store.uri)}</p>
{table({"columns": ["stage", "version", "state", "duration", "headline metrics"], "rows": summary_rows})}
<h2>Lineage</h2>
<div class="lineage">{lineage}</div>
{"".join(sections)}
<h2>Config</h2>
<details><summary>the composed config of this run</summary><pre>{html.escape(config)}</pre></details>
</body></html>
"""


def stage_section(store: Store, dag: DAG, stage: str, version: str, node: Mapping[str, Any], scratch: Path) -> str:
    head = f'<h2 id="{esc(stage)}">{esc(stage)} <span class="muted">{esc(version)}</span></h2>'
    state = node.get("state", "pending")
    if state == "failed":
        return head + f"<p>failed: <code>{esc(node.get('error', ''))}</code></p>"
    if not store.is_committed(stage, version):
        return head + f"<p class='muted'>{esc(state)}: no committed artifact</p>"
    artifact = store.load(stage, version)
    manifest = artifact.manifest
    built_by = manifest.get("run_id", "?")
    origin = "built by this run" if state == "done" else f"reused from run {built_by}"
    inputs = ", ".join(f"{k}/{v}" for k, v in artifact.inputs.items()) or "none"
    parts = [head, f"<p class='muted'>{esc(origin)} · inputs: {esc(inputs)}</p>"]
    spec = dag.specs.get(stage)
    if spec is not None and spec.report is not None:
        try:
            directory = store.localize(artifact, scratch, max_file_bytes=REPORT_FILE_MAX_BYTES)
            parts.append(render_sections(spec.report(directory)))
        except Exception as e:  # a report never fails because one stage's hook or files do
            parts.append(f"<p class='muted'>could not draw this stage's charts: {esc(type(e).__name__)}: "
                         f"{esc(e)}</p>")  # fmt: skip
    parts.append(metrics_table(manifest.get("metrics", {})))
    return "".join(parts)


def write_report(store: Store, dag: DAG, run_id: str, scratch: Path) -> str:
    """Write the run's report into its record; returns where it is (a local path on a local store)."""
    record = RunRecord(store, run_id, scratch)
    page = build_html(store, dag, run_id, scratch)
    store.write_bytes(f"{record.path}/{REPORT}", page.encode())
    return f"{record.path}/{REPORT}"
