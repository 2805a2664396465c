"""Row filters over normalised LAION tables (see `schema.normalize`).

Each filter is a pure function `(table, cfg) -> (keep_mask, reason)` registered in `REGISTRY`
with the canonical columns it needs. `apply_filters` runs the enabled filters in the configured
order and attributes every removed row to exactly one reason, so a funnel adds up:

* a null in a column a filter needs removes the row as `null_<column>` (at the first filter in
  the order that needs the column; NaN was already turned into null by `schema.normalize`);
* otherwise a row the filter rejects is removed with the filter's own reason (its name).

Defaults are the thresholds the Würstchen authors applied (shared/reference/wuerstchen.md): min
side >= 512, max side <= 4096, aesthetic >= 5.0, pwatermark <= 0.5, punsafe <= 0.99, captions with
at least 2 words. The default order runs the cheap numeric filters first, so the string filters
(regex over URLs and captions) only see the few rows that survive them.

Config classes here are plain dataclasses whose field metadata (`ge`, `le`, ...) is enforced by
`pipelines.config` when they are part of a phase config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Whitespace for caption rules: ASCII whitespace, spelled out so the regex means the same in RE2
# (pyarrow) and Python `re` (the pandas baseline in bench/filter.py).
WHITESPACE_CLASS = r"[ \t\n\r\f\v]"
NON_WHITESPACE_CLASS = r"[^ \t\n\r\f\v]"
MAX_WORDS_RULE = 1000  # RE2 refuses repetition counts above 1000


def _field(default: Any, **rules: Any) -> Any:
    return dataclasses.field(default=default, metadata=rules)


def _list_field(values: list, **rules: Any) -> Any:
    return dataclasses.field(default_factory=lambda: list(values), metadata=rules)


@dataclasses.dataclass
class UrlFilter:
    """URL sanity: an allowed scheme, a non-empty host, at most `max_length` bytes."""
    enabled: bool = True
    schemes: list[str] = _list_field(["http", "https"])
    max_length: int = _field(2048, ge=10)


@dataclasses.dataclass
class MinSideFilter:
    """min(WIDTH, HEIGHT) >= min."""
    enabled: bool = True
    min: int = _field(512, ge=0)


@dataclasses.dataclass
class MaxSideFilter:
    """max(WIDTH, HEIGHT) <= max."""
    enabled: bool = True
    max: int = _field(4096, ge=1)


@dataclasses.dataclass
class AspectRatioFilter:
    """max(W, H) / min(W, H) <= max (a zero side counts as an infinite ratio)."""
    enabled: bool = False
    max: float = _field(3.0, ge=1.0)


@dataclasses.dataclass
class AestheticFilter:
    """aesthetic >= min (LAION-Aesthetics score, 0..10)."""
    enabled: bool = True
    min: float = _field(5.0, ge=0.0, le=10.0)


@dataclasses.dataclass
class WatermarkFilter:
    """pwatermark <= max."""
    enabled: bool = True
    max: float = _field(0.5, ge=0.0, le=1.0)


@dataclasses.dataclass
class UnsafeFilter:
    """punsafe <= max."""
    enabled: bool = True
    max: float = _field(0.99, ge=0.0, le=1.0)


@dataclasses.dataclass
class SimilarityFilter:
    """similarity (CLIP ViT-B/32 image-text cosine) >= min."""
    enabled: bool = False
    min: float = _field(0.28, ge=-1.0, le=1.0)


@dataclasses.dataclass
class CaptionEmptyFilter:
    """The caption has at least one non-whitespace character."""
    enabled: bool = True


@dataclasses.dataclass
class CaptionWordsFilter:
    """The caption has at least `min` whitespace-separated words."""
    enabled: bool = True
    min: int = _field(2, ge=1, le=MAX_WORDS_RULE)


@dataclasses.dataclass
class CaptionForbiddenFilter:
    """The caption contains none of `substrings` (e.g. "www.", ".com", "http")."""
    enabled: bool = False
    substrings: list[str] = _list_field([])
    ignore_case: bool = True


@dataclasses.dataclass
class LanguageFilter:
    """LANGUAGE is one of `allowed` (laion2B-multi has the column; laion2B-en is English only)."""
    enabled: bool = False
    allowed: list[str] = _list_field(["en"])


DEFAULT_ORDER = ["min_side", "max_side", "aspect_ratio", "aesthetic", "watermark", "unsafe", "similarity",
                 "url", "caption_empty", "caption_words", "caption_forbidden", "language"]


@dataclasses.dataclass
class FiltersConfig:
    """All filters; `order` is the order they run in (and are reported in)."""
    order: list[str] = _list_field(DEFAULT_ORDER)
    url: UrlFilter = dataclasses.field(default_factory=UrlFilter)
    min_side: MinSideFilter = dataclasses.field(default_factory=MinSideFilter)
    max_side: MaxSideFilter = dataclasses.field(default_factory=MaxSideFilter)
    aspect_ratio: AspectRatioFilter = dataclasses.field(default_factory=AspectRatioFilter)
    aesthetic: AestheticFilter = dataclasses.field(default_factory=AestheticFilter)
    watermark: WatermarkFilter = dataclasses.field(default_factory=WatermarkFilter)
    unsafe: UnsafeFilter = dataclasses.field(default_factory=UnsafeFilter)
    similarity: SimilarityFilter = dataclasses.field(default_factory=SimilarityFilter)
    caption_empty: CaptionEmptyFilter = dataclasses.field(default_factory=CaptionEmptyFilter)
    caption_words: CaptionWordsFilter = dataclasses.field(default_factory=CaptionWordsFilter)
    caption_forbidden: CaptionForbiddenFilter = dataclasses.field(default_factory=CaptionForbiddenFilter)
    language: LanguageFilter = dataclasses.field(default_factory=LanguageFilter)

    def problems(self) -> list[str]:
        """Configuration mistakes, each naming its key (empty when the config is usable)."""
        out = []
        seen = set()
        for i, name in enumerate(self.order):
            if name not in REGISTRY:
                out.append(f"order[{i}]: unknown filter {name!r} (known: {', '.join(REGISTRY)})")
            elif name in seen:
                out.append(f"order[{i}]: filter {name!r} listed twice")
            seen.add(name)
        for name in REGISTRY:
            if getattr(self, name).enabled and name not in seen:
                out.append(f"order: filter {name!r} is enabled but not listed in the order")
        for i, scheme in enumerate(self.url.schemes):
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
                out.append(f"url.schemes[{i}]: not a URL scheme: {scheme!r}")
        if self.url.enabled and not self.url.schemes:
            out.append("url.schemes: empty list would remove every row; disable the filter instead")
        if self.language.enabled and not self.language.allowed:
            out.append("language.allowed: empty list would remove every row; disable the filter instead")
        if any(s == "" for s in self.caption_forbidden.substrings):
            out.append("caption_forbidden.substrings: the empty string matches every caption")
        return out

    def enabled(self) -> list[str]:
        """Names of the enabled filters, in run order."""
        return [name for name in self.order if name in REGISTRY and getattr(self, name).enabled]


# --------------------------------------------------------------------------------------------
# The filters


def _col(table: pa.Table, name: str) -> pa.ChunkedArray:
    return table.column(name)


def _threshold(column: pa.ChunkedArray, value: float) -> pa.Scalar:
    """The threshold in the column's own type: float32 scores compare with float32(value), i.e. as
    the decimal the file displays (see schema._scores)."""
    if pa.types.is_floating(column.type):
        return pa.scalar(value, column.type)
    return pa.scalar(float(value), pa.float64())


def url_filter(table: pa.Table, cfg: UrlFilter) -> tuple[pa.BooleanArray, str]:
    url = pc.utf8_trim_whitespace(_col(table, "URL"))
    schemes = "|".join(re.escape(s) for s in cfg.schemes)
    shaped = pc.match_substring_regex(url, f"^(?:{schemes})://[^/?#\\s]+", ignore_case=True)
    short = pc.less_equal(pc.binary_length(url), cfg.max_length)
    return pc.and_(shaped, short), "url"


def min_side_filter(table: pa.Table, cfg: MinSideFilter) -> tuple[pa.BooleanArray, str]:
    side = pc.min_element_wise(_col(table, "WIDTH"), _col(table, "HEIGHT"), skip_nulls=False)
    return pc.greater_equal(side, cfg.min), "min_side"


def max_side_filter(table: pa.Table, cfg: MaxSideFilter) -> tuple[pa.BooleanArray, str]:
    side = pc.max_element_wise(_col(table, "WIDTH"), _col(table, "HEIGHT"), skip_nulls=False)
    return pc.less_equal(side, cfg.max), "max_side"


def aspect_ratio_filter(table: pa.Table, cfg: AspectRatioFilter) -> tuple[pa.BooleanArray, str]:
    width = _col(table, "WIDTH").cast(pa.float64())
    height = _col(table, "HEIGHT").cast(pa.float64())
    long_side = pc.max_element_wise(width, height, skip_nulls=False)
    short_side = pc.min_element_wise(width, height, skip_nulls=False)
    # Float division: a zero side gives inf (or NaN for 0/0), both fail the comparison.
    ratio = pc.divide(long_side, short_side)
    ok = pc.and_(pc.greater(short_side, 0.0), pc.less_equal(ratio, cfg.max))
    return ok, "aspect_ratio"


def aesthetic_filter(table: pa.Table, cfg: AestheticFilter) -> tuple[pa.BooleanArray, str]:
    scores = _col(table, "aesthetic")
    return pc.greater_equal(scores, _threshold(scores, cfg.min)), "aesthetic"


def watermark_filter(table: pa.Table, cfg: WatermarkFilter) -> tuple[pa.BooleanArray, str]:
    scores = _col(table, "pwatermark")
    return pc.less_equal(scores, _threshold(scores, cfg.max)), "watermark"


def unsafe_filter(table: pa.Table, cfg: UnsafeFilter) -> tuple[pa.BooleanArray, str]:
    scores = _col(table, "punsafe")
    return pc.less_equal(scores, _threshold(scores, cfg.max)), "unsafe"


def similarity_filter(table: pa.Table, cfg: SimilarityFilter) -> tuple[pa.BooleanArray, str]:
    scores = _col(table, "similarity")
    return pc.greater_equal(scores, _threshold(scores, cfg.min)), "similarity"


def caption_empty_filter(table: pa.Table, cfg: CaptionEmptyFilter) -> tuple[pa.BooleanArray, str]:
    return pc.match_substring_regex(_col(table, "TEXT"), NON_WHITESPACE_CLASS), "caption_empty"


def words_pattern(min_words: int) -> str:
    """Regex that matches a caption with at least `min_words` whitespace-separated words."""
    word = f"{NON_WHITESPACE_CLASS}+"
    if min_words <= 1:
        return word
    return f"{word}(?:{WHITESPACE_CLASS}+{word}){{{min_words - 1}}}"


def caption_words_filter(table: pa.Table, cfg: CaptionWordsFilter) -> tuple[pa.BooleanArray, str]:
    return pc.match_substring_regex(_col(table, "TEXT"), words_pattern(cfg.min)), "caption_words"


def caption_forbidden_filter(table: pa.Table, cfg: CaptionForbiddenFilter) -> tuple[pa.BooleanArray, str]:
    text = _col(table, "TEXT")
    if not cfg.substrings:
        return pc.is_valid(text), "caption_forbidden"
    pattern = "|".join(re.escape(s) for s in cfg.substrings)
    found = pc.match_substring_regex(text, pattern, ignore_case=cfg.ignore_case)
    return pc.invert(found), "caption_forbidden"


def language_filter(table: pa.Table, cfg: LanguageFilter) -> tuple[pa.BooleanArray, str]:
    language = _col(table, "LANGUAGE")
    return pc.is_in(language, value_set=pa.array(cfg.allowed, pa.string())), "language"


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    name: str
    func: Callable[[pa.Table, Any], tuple[pa.BooleanArray, str]]
    columns: tuple[str, ...]  # canonical columns it reads: a null there removes the row as null_<col>
    rule: Callable[[Any], str]  # human-readable rule for the funnel report


REGISTRY: dict[str, FilterSpec] = {spec.name: spec for spec in (
    FilterSpec("url", url_filter, ("URL",),
               lambda c: f"URL scheme in {c.schemes}, non-empty host, <= {c.max_length} bytes"),
    FilterSpec("min_side", min_side_filter, ("WIDTH", "HEIGHT"), lambda c: f"min(WIDTH, HEIGHT) >= {c.min}"),
    FilterSpec("max_side", max_side_filter, ("WIDTH", "HEIGHT"), lambda c: f"max(WIDTH, HEIGHT) <= {c.max}"),
    FilterSpec("aspect_ratio", aspect_ratio_filter, ("WIDTH", "HEIGHT"),
               lambda c: f"max(W, H) / min(W, H) <= {c.max}"),
    FilterSpec("aesthetic", aesthetic_filter, ("aesthetic",), lambda c: f"aesthetic >= {c.min}"),
    FilterSpec("watermark", watermark_filter, ("pwatermark",), lambda c: f"pwatermark <= {c.max}"),
    FilterSpec("unsafe", unsafe_filter, ("punsafe",), lambda c: f"punsafe <= {c.max}"),
    FilterSpec("similarity", similarity_filter, ("similarity",), lambda c: f"similarity >= {c.min}"),
    FilterSpec("caption_empty", caption_empty_filter, ("TEXT",), lambda c: "caption has a non-space character"),
    FilterSpec("caption_words", caption_words_filter, ("TEXT",), lambda c: f"caption has >= {c.min} words"),
    FilterSpec("caption_forbidden", caption_forbidden_filter, ("TEXT",),
               lambda c: f"caption contains none of {c.substrings}"
                         + (" (case-insensitive)" if c.ignore_case else "")),
    FilterSpec("language", language_filter, ("LANGUAGE",), lambda c: f"LANGUAGE in {c.allowed}"),
)}


def required_columns(cfg: FiltersConfig) -> dict[str, list[str]]:
    """Canonical column -> enabled filters that need it (for missing-column errors)."""
    needed: dict[str, list[str]] = {}
    for name in cfg.enabled():
        for column in REGISTRY[name].columns:
            needed.setdefault(column, []).append(name)
    return needed


# --------------------------------------------------------------------------------------------
# Running the filters with exact accounting


@dataclasses.dataclass
class FilterStep:
    """What one filter removed: reason -> rows (null reasons first, then the filter's own)."""
    name: str
    rule: str
    removed: dict[str, int]


def step_reasons(cfg: FiltersConfig) -> list[tuple[str, str, list[str]]]:
    """(filter, rule, reasons) per enabled filter in order; a column's null reason is listed at
    the first filter that needs the column (later filters never see its nulls)."""
    out = []
    seen_columns: set[str] = set()
    for name in cfg.enabled():
        spec = REGISTRY[name]
        reasons = [f"null_{c}" for c in spec.columns if c not in seen_columns]
        seen_columns.update(spec.columns)
        out.append((name, spec.rule(getattr(cfg, name)), reasons + [name]))
    return out


def _to_numpy_bool(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Arrow boolean (nulls = not kept) -> numpy bool."""
    mask = pc.fill_null(mask, False)
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks() if mask.num_chunks != 1 else mask.chunk(0)
    return mask.to_numpy(zero_copy_only=False)


def _valid(column: pa.ChunkedArray) -> np.ndarray:
    if column.null_count == 0:
        return np.ones(len(column), dtype=bool)
    return _to_numpy_bool(pc.is_valid(column))


# Below this fraction of surviving rows the working set is compacted, so the remaining (more
# expensive, string) filters only look at survivors.
COMPACT_BELOW = 0.5


def apply_filters(table: pa.Table, cfg: FiltersConfig, reason_codes: np.ndarray | None = None
                  ) -> tuple[np.ndarray, list[FilterStep]]:
    """Run the enabled filters in order over `table`.

    Returns the keep mask over the rows of `table` (numpy bool) and one `FilterStep` per enabled
    filter with the rows it removed per reason; `table.num_rows == mask.sum() + all removed`.
    Each filter sees a table of just its columns; once most rows are gone, those columns are
    copied for the surviving rows only (a filter never pays for columns it does not read).
    `reason_codes` (int16, one per row, filled with -1): set to each removed row's reason, as an index
    into `reason_list(cfg)` (for sampling removed rows per reason)."""
    rows = table.num_rows
    positions: np.ndarray | None = None  # rows of `table` in the working set; None: all of them
    compacted: dict[str, pa.ChunkedArray | pa.Array] = {}  # columns restricted to `positions`
    alive = np.ones(rows, dtype=bool)  # over the working set
    steps = []
    code = 0

    def mark(removed_now: np.ndarray) -> None:
        if reason_codes is not None and removed_now.any():
            at = np.flatnonzero(removed_now)
            reason_codes[at if positions is None else positions[at]] = code

    for name, rule, reasons in step_reasons(cfg):
        spec = REGISTRY[name]
        if positions is not None:
            for column in spec.columns:
                if column not in compacted:
                    compacted[column] = table.column(column).take(pa.array(positions))
        view = pa.table({c: table.column(c) if positions is None else compacted[c] for c in spec.columns})
        removed = dict.fromkeys(reasons, 0)
        for reason in reasons[:-1]:
            nulls = alive & ~_valid(view.column(reason[len("null_"):]))
            removed[reason] = int(nulls.sum())
            mark(nulls)
            code += 1
            alive &= ~nulls
        keep, reason = spec.func(view, getattr(cfg, name))
        if reason != name:
            raise AssertionError(f"filter {name!r} reported reason {reason!r}")
        rejected = alive & ~_to_numpy_bool(keep)
        removed[name] = int(rejected.sum())
        mark(rejected)
        code += 1
        alive &= ~rejected
        steps.append(FilterStep(name, rule, removed))
        if len(alive) and alive.sum() < COMPACT_BELOW * len(alive):
            survivors = pa.array(alive)
            compacted = {c: values.filter(survivors) for c, values in compacted.items()}
            positions = np.flatnonzero(alive) if positions is None else positions[alive]
            alive = np.ones(len(positions), dtype=bool)
    if positions is None:
        return alive, steps
    mask = np.zeros(rows, dtype=bool)
    mask[positions[alive]] = True
    return mask, steps


def reason_list(cfg: FiltersConfig) -> list[tuple[str, str, list[str]]]:
    """Every removal reason in run order, as (reason, filter, the filter's columns): what `apply_filters`'
    reason codes index."""
    return [(reason, name, list(REGISTRY[name].columns))
            for name, _, reasons in step_reasons(cfg) for reason in reasons]


def merge_steps(total: list[FilterStep] | None, part: list[FilterStep]) -> list[FilterStep]:
    """Sum two funnels of the same config (e.g. over batches)."""
    if total is None:
        return [FilterStep(s.name, s.rule, dict(s.removed)) for s in part]
    for acc, step in zip(total, part):
        if acc.name != step.name:
            raise ValueError(f"cannot merge funnels of different configs ({acc.name} vs {step.name})")
        for reason, count in step.removed.items():
            acc.removed[reason] = acc.removed.get(reason, 0) + count
    return total


def empty_steps(cfg: FiltersConfig) -> list[FilterStep]:
    return [FilterStep(name, rule, dict.fromkeys(reasons, 0)) for name, rule, reasons in step_reasons(cfg)]
