"""The report's numbers (issue 24): histograms with fixed bins that match numpy's and merge exactly, removed
rows sampled per reason that really fail their filter, and the charts and page written from them."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa

from data_filters import filters, profile
from pipelines import reports


def _table(rng: np.random.Generator, n: int) -> pa.Table:
    aesthetic = rng.uniform(-1, 11, n).astype(np.float32)
    width = rng.integers(0, 20000, n)
    return pa.table({
        "URL": [f"http://h{i % 7}.example/{i}.jpg" for i in range(n)],
        "TEXT": [f"caption {i}" if i % 11 else "" for i in range(n)],
        "aesthetic": pa.array(aesthetic, pa.float32(), mask=rng.random(n) < 0.05),
        "pwatermark": pa.array(rng.random(n).astype(np.float32)),
        "punsafe": pa.array(rng.random(n).astype(np.float32)),
        "WIDTH": pa.array(width, pa.int64()), "HEIGHT": pa.array(rng.integers(1, 20000, n), pa.int64()),
    })


def test_histograms_match_numpy_and_merge_exactly():
    rng = np.random.default_rng(0)
    table = _table(rng, 5000)
    hists = profile.histograms(table)
    assert set(hists) == {"aesthetic", "pwatermark", "punsafe", "WIDTH", "HEIGHT"}
    for column, hist in hists.items():
        values = table.column(column).drop_null().to_numpy().astype(np.float64)
        edges = profile.bin_edges(column)
        expected, _ = np.histogram(values[(values >= edges[0]) & (values <= edges[-1])], bins=edges)
        # float32 binning may move a value sitting on an edge by one bin; nothing is lost or doubled.
        assert np.abs(np.array(hist["counts"]) - expected).sum() <= 2, column
        assert hist["below"] == int((values < edges[0]).sum()) and hist["above"] == int((values > edges[-1]).sum())
        assert sum(hist["counts"]) + hist["below"] + hist["above"] + hist["nulls"] == table.num_rows
    halves = profile.merge_histograms(profile.histograms(table.slice(0, 1234)), profile.histograms(table.slice(1234)))
    assert halves == hists


def test_sampled_removed_rows_fail_their_filter_and_come_first_in_input_order():
    rng = np.random.default_rng(1)
    table = _table(rng, 3000)
    cfg = filters.FiltersConfig()
    cfg.url.enabled = False
    codes = np.full(table.num_rows, -1, dtype=np.int16)
    keep, steps = filters.apply_filters(table, cfg, codes)
    reasons = filters.reason_list(cfg)
    removed = {r: c for s in steps for r, c in s.removed.items()}
    assert {reasons[c][0]: int((codes == c).sum()) for c in range(len(reasons))} == removed
    assert ((codes >= 0) == ~keep).all()
    samples = profile.sample_removed(table, codes, cfg, 5)
    assert set(samples) == {r for r, c in removed.items() if c}
    first_min_side = np.flatnonzero(codes == next(i for i, r in enumerate(reasons) if r[0] == "min_side"))[:5]
    assert [s["URL"] for s in samples["min_side"]] == [table.column("URL")[int(i)].as_py() for i in first_min_side]
    for row in samples["min_side"]:
        assert min(row["values"]["WIDTH"], row["values"]["HEIGHT"]) < cfg.min_side.min
    for row in samples["aesthetic"]:
        assert row["values"]["aesthetic"] < cfg.aesthetic.min
    for row in samples["null_aesthetic"]:
        assert row["values"]["aesthetic"] is None
    # Split in two and merged: the same first rows.
    cut = 1000
    first = profile.sample_removed(table.slice(0, cut), codes[:cut], cfg, 5)
    have = {r: len(v) for r, v in first.items()}
    merged = profile.merge_samples(first, profile.sample_removed(table.slice(cut), codes[cut:], cfg, 5, have), 5)
    assert merged == samples


def test_counts_report_writes_chart_page_and_thumbnails(tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(buffer, format="PNG")
    files = reports.counts_report(str(tmp_path), "download", "v1", {"http_404": 3, "timeout": 1}, kept=10,
                                  samples={"http_404": [{"url": "http://127.0.0.1/x.jpg", "error": "404"}]},
                                  thumbnails=[(buffer.getvalue(), "a grey box")] * 3 + [(b"broken", "x")])
    assert set(files) == {"reasons.png", "thumbnails.png", reports.REPORT_JSON, reports.REPORT_HTML}
    summary = json.load(open(files[reports.REPORT_JSON]))
    assert summary["kept"] == 10 and summary["dropped_by_reason"] == {"http_404": 3, "timeout": 1}
    with Image.open(files["thumbnails.png"]) as grid:
        assert grid.size == (6 * 104, 126)  # one row of six cells, the undecodable image left out
    page = open(files[reports.REPORT_HTML]).read()
    assert page.count("data:image/png;base64,") == 2 and "http://127.0.0.1/x.jpg" in page
    assert os.path.getsize(files["reasons.png"]) > 1000
