"""Pictures of what a phase kept and removed: charts (PNG), sample tables and one self-contained
``report.html`` per output (images inlined), logged to MLflow under ``report/``.

`filter_report` draws the filter's funnel, the histograms of the filtered columns with the configured
thresholds and the sampled removed rows per reason; `counts_report` the reasons of a phase that drops
samples (download failures, precompute skips), with sampled items and an optional thumbnail grid. The numbers
drawn are the ones in the returned dict (written as ``report.json``), so a test can check the chart against
the funnel. matplotlib (Agg) only; nothing here reads the data again.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Optional, Sequence

import numpy as np

from pipelines import storage

REPORT_DIR = "report"  # inside the output: report.html, report.json, *.png; the same under MLflow artifacts
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Charts


def funnel_stages(funnel: dict) -> list[tuple[str, int]]:
    """(label, rows) from rows read, after each filter in order, after de-dup, to rows written."""
    stages = [("rows read", int(funnel["rows_read"]))]
    stages += [(f"after {step['filter']}", int(step["rows_after"])) for step in funnel["filters"]]
    stages.append(("after de-dup", int(funnel["rows_after_filters"]) - int(funnel["duplicates_removed"])))
    stages.append(("written", int(funnel["rows_written"])))
    return stages


def funnel_chart(stages: Sequence[tuple[str, int]], title: str) -> bytes:
    plt = _pyplot()
    labels, rows = [s[0] for s in stages], [s[1] for s in stages]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(stages) + 1.2))
    bars = axes.barh(range(len(stages)), rows, color="#4c72b0")
    axes.set_yticks(range(len(stages)), labels)
    axes.invert_yaxis()
    top = max(rows) if rows and max(rows) else 1
    for bar, value in zip(bars, rows):
        share = f" ({100 * value / rows[0]:.1f}%)" if rows[0] else ""
        axes.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, f"{value:,}{share}",
                  va="center", fontsize=8)
    axes.set_xlim(0, 1.25 * top)
    axes.set_xlabel("rows")
    axes.set_title(title)
    return _png(figure)


def bar_chart(counts: dict[str, int], title: str, xlabel: str = "samples") -> bytes:
    plt = _pyplot()
    items = sorted(counts.items(), key=lambda kv: -kv[1]) or [("(none)", 0)]
    figure, axes = plt.subplots(figsize=(8, 0.4 * len(items) + 1.2))
    axes.barh(range(len(items)), [v for _, v in items], color="#c44e52")
    axes.set_yticks(range(len(items)), [k for k, _ in items])
    axes.invert_yaxis()
    for i, (_, value) in enumerate(items):
        axes.text(value, i, f" {value:,}", va="center", fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    return _png(figure)


def histogram_chart(column: str, hist: dict, edges: np.ndarray, lines: list[dict], log_x: bool) -> bytes:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.stairs(hist["counts"], edges, fill=True, color="#55a868")
    for line in lines:
        axes.axvline(line["value"], color="#c44e52", linestyle="--")
        axes.text(line["value"], axes.get_ylim()[1] * 0.95, " " + line["label"], color="#c44e52", fontsize=8,
                  va="top")
    if log_x:
        axes.set_xscale("log", base=2)
    outside = f"below {hist['below']:,}, above {hist['above']:,}, null {hist['nulls']:,}"
    axes.set_title(f"{column} over the input ({outside})", fontsize=9)
    axes.set_ylabel("rows")
    return _png(figure)


def thumbnail_grid(images: Sequence[tuple[bytes, str]], columns: int = 6, size: int = 96) -> Optional[bytes]:
    """Encoded images with captions -> one PNG grid (captions cut under each thumbnail); None without images."""
    from PIL import Image, ImageDraw

    thumbs = []
    for data, caption in images:
        try:
            with Image.open(io.BytesIO(data)) as image:
                thumb = image.convert("RGB")
                thumb.thumbnail((size, size))
                thumbs.append((thumb.copy(), caption))
        except Exception:  # noqa: BLE001 - a thumbnail that does not decode is left out of the picture
            continue
    if not thumbs:
        return None
    rows = -(-len(thumbs) // columns)
    cell_w, cell_h = size + 8, size + 30
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (thumb, caption) in enumerate(thumbs):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        grid.paste(thumb, (x + (size - thumb.width) // 2, y + (size - thumb.height) // 2))
        text = caption if len(caption) <= 34 else caption[:32] + ".."
        draw.text((x, y + size + 2), text[:17], fill="black")
        draw.text((x, y + size + 13), text[17:34], fill="black")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Reports


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _text(value: Any) -> str:
    if value is None:
        return "null"
    return value if isinstance(value, str) else json.dumps(value)


def write_report(out_dir: str, title: str, summary: dict, images: dict[str, bytes], sections: list[str]) -> dict:
    """`<out_dir>/report/`: the PNGs, report.json (`summary`) and report.html (images inlined); returns
    {file name: uri} of what was written."""
    folder = storage.join(out_dir, REPORT_DIR)
    written = {}
    for name, data in images.items():
        uri = storage.join(folder, name)
        storage.write_bytes(uri, data)
        written[name] = uri
    storage.write_json(storage.join(folder, REPORT_JSON), summary)
    written[REPORT_JSON] = storage.join(folder, REPORT_JSON)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;max-width:480px;"
             "overflow-wrap:anywhere}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
    storage.write_text(storage.join(folder, REPORT_HTML), page)
    written[REPORT_HTML] = storage.join(folder, REPORT_HTML)
    return written


def inline(data: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def filter_report(out_dir: str, version: str, funnel: dict, histograms: dict[str, dict],
                  thresholds: dict[str, list[dict]], samples: dict[str, list[dict]]) -> dict:
    """The filter's report next to funnel.json; returns {file name: uri}."""
    from data_filters import profile

    stages = funnel_stages(funnel)
    images = {"funnel.png": funnel_chart(stages, f"filter {version}: rows through the funnel")}
    rules = {reason: step["rule"] for step in funnel["filters"] for reason in step["removed"]}
    sections = [f"<h2>Funnel</h2>{inline(images['funnel.png'], 'funnel')}",
                _table([{"stage": label, "rows": rows} for label, rows in stages], ["stage", "rows"])]
    for column, hist in histograms.items():
        scale = profile.HISTOGRAMS[column][0]
        name = f"hist-{column}.png"
        images[name] = histogram_chart(column, hist, profile.bin_edges(column), thresholds.get(column, []),
                                       log_x=scale == "log2")
        sections.append(f"<h2>{html.escape(column)}</h2>{inline(images[name], column)}")
    sections.append("<h2>Removed rows, sampled per reason</h2>")
    removed = {reason: count for step in funnel["filters"] for reason, count in step["removed"].items()}
    for reason, rows in samples.items():
        flat = [{"URL": r["URL"], "caption": r["TEXT"], "value": r["values"], "rule": rules.get(reason)} for r in rows]
        sections.append(f"<h3>{html.escape(reason)} ({removed.get(reason, 0):,} removed; rule: "
                        f"{html.escape(str(rules.get(reason)))})</h3>" + _table(flat, ["URL", "caption", "value", "rule"]))
    summary = {"phase": "filter", "version": version, "funnel_stages": [list(s) for s in stages],
               "histograms": {c: {**h, "edges": profile.bin_edges(c).tolist()} for c, h in histograms.items()},
               "thresholds": thresholds, "samples": samples, "rules": rules}
    return write_report(out_dir, f"filter {version}", summary, images, sections)


def counts_report(out_dir: str, phase: str, version: str, counts: dict[str, int], kept: int,
                  samples: dict[str, list[dict]], thumbnails: Sequence[tuple[bytes, str]] = ()) -> dict:
    """A phase's drops by reason (`counts`) next to what it kept: a chart, sampled items per reason, and a
    thumbnail grid of kept samples (images with captions) when given; returns {file name: uri}."""
    images = {"reasons.png": bar_chart({"kept": kept, **counts}, f"{phase} {version}: kept and dropped by reason")}
    sections = [f"<h2>Kept and dropped</h2>{inline(images['reasons.png'], 'reasons')}",
                _table([{"reason": k, "samples": v} for k, v in {"kept": kept, **counts}.items()], ["reason", "samples"])]
    grid = thumbnail_grid(thumbnails) if thumbnails else None
    if grid:
        images["thumbnails.png"] = grid
        sections.append(f"<h2>Sampled kept samples</h2>{inline(grid, 'thumbnails')}")
    for reason, rows in samples.items():
        columns = sorted({k for r in rows for k in r})
        sections.append(f"<h3>{html.escape(reason)} ({counts.get(reason, 0):,})</h3>{_table(rows, columns)}")
    summary = {"phase": phase, "version": version, "kept": kept, "dropped_by_reason": counts, "samples": samples}
    return write_report(out_dir, f"{phase} {version}", summary, images, sections)
