"""What the filters saw and removed, for the filter's report: fixed-bin histograms of the filtered columns over
the input, and sampled removed rows per reason. Pure functions over normalised tables (`schema.normalize`),
computed in the filter tasks' one streaming pass; partial results merge exactly (sums of counts, samples
in input order), so the report does not depend on how the input was split into tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from data_filters.filters import FiltersConfig, reason_list

# column -> (scale, low, high, bins): fixed edges, so histograms of different tasks and runs add up and compare.
# log2: bins are equal in log2(value), edges low..high (a side of 0 is counted `below`).
HISTOGRAMS: dict[str, tuple[str, float, float, int]] = {
    "aesthetic": ("linear", 0.0, 10.0, 100),
    "pwatermark": ("linear", 0.0, 1.0, 100),
    "punsafe": ("linear", 0.0, 1.0, 100),
    "similarity": ("linear", -0.2, 0.6, 80),
    "WIDTH": ("log2", 8.0, 16384.0, 44),
    "HEIGHT": ("log2", 8.0, 16384.0, 44),
}
SAMPLE_TEXT_CHARS = 300  # captions are cut in samples (a report, not a copy of the data)


def bin_edges(column: str) -> np.ndarray:
    scale, low, high, bins = HISTOGRAMS[column]
    if scale == "log2":
        return np.exp2(np.linspace(np.log2(low), np.log2(high), bins + 1))
    return np.linspace(low, high, bins + 1)


def empty_histogram(column: str) -> dict[str, Any]:
    return {"counts": [0] * HISTOGRAMS[column][3], "below": 0, "above": 0, "nulls": 0}


def histograms(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Per histogram column present in `table`: bin counts, rows below the first / above the last edge, nulls."""
    out = {}
    for column, (scale, low, high, bins) in HISTOGRAMS.items():
        if column not in table.column_names:
            continue
        data = table.column(column)
        nulls = int(data.null_count)
        if nulls:
            data = data.drop_null()
        # float32 arithmetic (scores are float32 already): half the memory traffic of float64, and bins of
        # 0.1 / 0.01 / 1/4 octave are far coarser than its precision.
        values = data.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        if scale == "log2":
            with np.errstate(divide="ignore"):
                position = (np.log2(values) - np.float32(np.log2(low))) * np.float32(bins / (np.log2(high) - np.log2(low)))
        else:
            position = (values - np.float32(low)) * np.float32(bins / (high - low))
        np.clip(position, -1.0, float(bins), out=position)  # -inf (a side of 0) / inf: below / above
        index = np.floor(position).astype(np.int64)
        index[values == np.float32(high)] = bins - 1  # the last bin is closed, as numpy.histogram's
        below, above = int((index < 0).sum()), int((index >= bins).sum())
        inside = index[(index >= 0) & (index < bins)]
        out[column] = {"counts": np.bincount(inside, minlength=bins).tolist(), "below": below, "above": above,
                       "nulls": nulls}
    return out


def merge_histograms(total: dict[str, dict], part: dict[str, dict]) -> dict[str, dict]:
    for column, hist in part.items():
        acc = total.setdefault(column, empty_histogram(column))
        acc["counts"] = [a + b for a, b in zip(acc["counts"], hist["counts"])]
        for key in ("below", "above", "nulls"):
            acc[key] += hist[key]
    return total


def thresholds(cfg: FiltersConfig) -> dict[str, list[dict[str, Any]]]:
    """Per histogram column, the enabled filters' thresholds on it: what the report draws on the histogram."""
    out: dict[str, list[dict[str, Any]]] = {}

    def add(column: str, value: float, label: str) -> None:
        out.setdefault(column, []).append({"value": float(value), "label": label})

    if cfg.aesthetic.enabled:
        add("aesthetic", cfg.aesthetic.min, f"aesthetic.min {cfg.aesthetic.min}")
    if cfg.watermark.enabled:
        add("pwatermark", cfg.watermark.max, f"watermark.max {cfg.watermark.max}")
    if cfg.unsafe.enabled:
        add("punsafe", cfg.unsafe.max, f"unsafe.max {cfg.unsafe.max}")
    if cfg.similarity.enabled:
        add("similarity", cfg.similarity.min, f"similarity.min {cfg.similarity.min}")
    for side in ("WIDTH", "HEIGHT"):
        if cfg.min_side.enabled:
            add(side, cfg.min_side.min, f"min_side.min {cfg.min_side.min}")
        if cfg.max_side.enabled:
            add(side, cfg.max_side.max, f"max_side.max {cfg.max_side.max}")
    return out


def _value(column: pa.ChunkedArray, row: int) -> Any:
    value = column[row].as_py()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def sample_removed(table: pa.Table, reason_codes: np.ndarray, cfg: FiltersConfig, per_reason: int,
                   have: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Up to `per_reason` removed rows per reason (the first in `table`'s order; `have`: how many each reason
    already has), each with its URL, caption and the values of the columns its filter reads."""
    reasons = reason_list(cfg)
    have = have or {}
    out: dict[str, list[dict[str, Any]]] = {}
    if per_reason <= 0 or not len(reason_codes):
        return out
    for code in np.unique(reason_codes[reason_codes >= 0]).tolist():
        reason, _, columns = reasons[code]
        wanted = per_reason - have.get(reason, 0)
        if wanted <= 0:
            continue
        rows = np.flatnonzero(reason_codes == code)[:wanted].tolist()
        samples = []
        for row in rows:
            text = _value(table.column("TEXT"), row) if "TEXT" in table.column_names else None
            samples.append({
                "URL": _value(table.column("URL"), row) if "URL" in table.column_names else None,
                "TEXT": text[:SAMPLE_TEXT_CHARS] if isinstance(text, str) else text,
                "values": {c: _value(table.column(c), row) for c in columns if c in table.column_names},
            })
        out[reason] = samples
    return out


def merge_samples(total: dict[str, list], part: dict[str, list], per_reason: int) -> dict[str, list]:
    """Samples of an earlier part first: the report keeps the first `per_reason` rows in input order."""
    for reason, rows in part.items():
        acc = total.setdefault(reason, [])
        acc.extend(rows[:max(0, per_reason - len(acc))])
    return total
