"""One schema for every LAION variant.

LAION metadata comes in several shapes (see shared/reference/ecosystem.md): the aesthetic score is
`aesthetic` (float32, V1) or `AESTHETIC_SCORE` (float64, improved-aesthetics V2); WIDTH/HEIGHT are
int32 in some files and float64 in others; LANGUAGE only exists in laion2B-multi; V2 files carry a
pandas `__index_level_0__`; nulls and NaN occur. `resolve_columns` maps a file's column names to
the canonical ones and `normalize` casts a table of that file to the contract of `filtered/`:

    uid string, URL string, TEXT string, WIDTH int64, HEIGHT int64, aesthetic float64,
    punsafe float64, pwatermark float64, similarity float64, [LANGUAGE string], hash int64, [extras]

A canonical column absent from a file becomes all-null (the filter phase refuses to run an
enabled filter on a column that is missing, so such nulls only reach columns nobody filters on).
NaN and +-inf in numeric columns are treated as missing values (null): a NaN aesthetic score is
not a score. Scores keep the file's float precision until `conform` (see `_scores`). `uid` is added after filtering (`add_uid`), so only surviving rows pay for hashing.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from data_filters import hashing

# Canonical name -> accepted source names, in order of preference. The improved-aesthetics (V2)
# score comes first: the Würstchen paper trained on the improved-aesthetic LAION-5B subsets.
ALIASES: dict[str, tuple[str, ...]] = {
    "URL": ("URL", "url"),
    "TEXT": ("TEXT", "caption", "text"),
    "WIDTH": ("WIDTH", "width"),
    "HEIGHT": ("HEIGHT", "height"),
    "aesthetic": ("AESTHETIC_SCORE", "aesthetic", "aesthetic_score"),
    # LAION-400M has no punsafe, but an NSFW tag (UNLIKELY / UNSURE / NSFW), mapped by `value_maps`.
    "punsafe": ("punsafe", "PUNSAFE", "NSFW"),
    "pwatermark": ("pwatermark", "PWATERMARK"),
    "similarity": ("similarity", "SIMILARITY"),
    "LANGUAGE": ("LANGUAGE", "language"),
    "hash": ("hash", "HASH"),
}

STRING_COLUMNS = ("URL", "TEXT", "LANGUAGE")
SIZE_COLUMNS = ("WIDTH", "HEIGHT")
SCORE_COLUMNS = ("aesthetic", "punsafe", "pwatermark", "similarity")

CANONICAL_TYPES: dict[str, pa.DataType] = {
    "uid": pa.string(),
    "URL": pa.string(),
    "TEXT": pa.string(),
    "WIDTH": pa.int64(),
    "HEIGHT": pa.int64(),
    "aesthetic": pa.float64(),
    "punsafe": pa.float64(),
    "pwatermark": pa.float64(),
    "similarity": pa.float64(),
    "LANGUAGE": pa.string(),
    "hash": pa.int64(),
}

class SchemaError(ValueError):
    """A column has a type that cannot be normalised; the message names the column."""


def resolve_columns(names: Iterable[str], rename: Mapping[str, str] | None = None) -> dict[str, str]:
    """Canonical column -> the column of this file that provides it (only those present).

    `rename` (canonical -> source name) overrides the built-in aliases, e.g.
    `{"aesthetic": "aesthetic"}` to pick the V1 score in a file that carries both."""
    present = list(names)
    lower = {name.lower(): name for name in present}
    rename = dict(rename or {})
    unknown = sorted(set(rename) - set(ALIASES))
    if unknown:
        raise SchemaError(f"unknown canonical column {unknown[0]!r} in column mapping "
                          f"(known: {', '.join(ALIASES)})")
    resolved: dict[str, str] = {}
    for canonical, aliases in ALIASES.items():
        candidates = (rename[canonical],) if canonical in rename else aliases
        for name in candidates:
            if name in present:
                resolved[canonical] = name
                break
        else:
            if canonical not in rename:
                for name in candidates:
                    if name.lower() in lower:
                        resolved[canonical] = lower[name.lower()]
                        break
    return resolved


def output_schema(include_language: bool, extra_types: Mapping[str, pa.DataType] | None = None) -> pa.Schema:
    """Schema of `filtered/<version>/part-*.parquet`."""
    names = ["uid", "URL", "TEXT", "WIDTH", "HEIGHT", "aesthetic", "punsafe", "pwatermark", "similarity"]
    if include_language:
        names.append("LANGUAGE")
    names.append("hash")
    fields = [pa.field(name, CANONICAL_TYPES[name]) for name in names]
    fields += [pa.field(name, dtype) for name, dtype in (extra_types or {}).items()]
    return pa.schema(fields)


def _nan_to_null(values: pa.Array) -> pa.Array:
    bad = pc.or_(pc.is_nan(values), pc.is_inf(values))
    if not pc.any(bad).as_py():
        return values
    return pc.if_else(bad, pa.scalar(None, values.type), values)


def _sizes(values: pa.Array, column: str) -> pa.Array:
    """int or float pixel sizes -> int64 (NaN/inf -> null, floats rounded to the nearest int)."""
    dtype = values.type
    if pa.types.is_integer(dtype):
        return values.cast(pa.int64())
    if pa.types.is_floating(dtype):
        values = _nan_to_null(values.cast(pa.float64()))
        # Sizes beyond 2^53 px are garbage; null them rather than overflow the int64 cast.
        too_big = pc.greater(pc.abs(values), 2.0 ** 53)
        if pc.any(too_big).as_py():
            values = pc.if_else(too_big, pa.scalar(None, pa.float64()), values)
        return pc.round(values).cast(pa.int64(), safe=False)
    if pa.types.is_decimal(dtype):
        return pc.round(values).cast(pa.int64())
    raise SchemaError(f"column {column!r}: expected integer or float sizes, got {dtype}")


def _scores(values: pa.Array, column: str) -> pa.Array:
    """Scores stay in the precision the file stores (float32 or float64; ints become float64).

    Filters compare a float32 score with the threshold rounded to float32, which is the same as
    comparing the decimal the file displays: a stored 0.99f passes `punsafe <= 0.99`, while
    widening it first (0.9900000095) would drop it. `conform` widens survivors to float64."""
    dtype = values.type
    if pa.types.is_float16(dtype):
        return _nan_to_null(values.cast(pa.float32()))
    if pa.types.is_floating(dtype):
        return _nan_to_null(values)
    if pa.types.is_integer(dtype) or pa.types.is_decimal(dtype):
        return values.cast(pa.float64())
    raise SchemaError(f"column {column!r}: expected a numeric score, got {dtype}")


def _strings(values: pa.Array, column: str) -> pa.Array:
    dtype = values.type
    if pa.types.is_string(dtype):
        return values
    if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype) or pa.types.is_dictionary(dtype):
        return values.cast(pa.string())
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        try:
            return values.cast(pa.string())
        except pa.ArrowInvalid as exc:
            raise SchemaError(f"column {column!r}: binary values are not valid UTF-8 ({exc})") from None
    if pa.types.is_null(dtype):
        return pa.nulls(len(values), pa.string())
    raise SchemaError(f"column {column!r}: expected strings, got {dtype}")


def _integers(values: pa.Array, column: str) -> pa.Array:
    dtype = values.type
    if pa.types.is_integer(dtype):
        return values.cast(pa.int64(), safe=False)  # uint64 LAION hashes wrap into int64
    if pa.types.is_floating(dtype):
        return _nan_to_null(values.cast(pa.float64())).cast(pa.int64(), safe=False)
    if pa.types.is_null(dtype):
        return pa.nulls(len(values), pa.int64())
    raise SchemaError(f"column {column!r}: expected integers, got {dtype}")


def _column(table: pa.Table, name: str) -> pa.Array:
    values = table.column(name)
    return values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)


# LAION-400M's NSFW tag as a punsafe value: UNSURE passes the paper's punsafe <= 0.99, NSFW does not.
DEFAULT_VALUE_MAPS: dict[str, dict[str, float]] = {"punsafe": {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}}


def map_values(values: pa.Array, mapping: Mapping[str, float], column: str) -> pa.Array:
    """String tags -> float64 scores through `mapping` (exact, case-sensitive); a tag not in it becomes null."""
    strings = _strings(values, column)
    keys = pa.array(list(mapping), pa.string())
    index = pc.index_in(strings, value_set=keys)
    return pc.take(pa.array(list(mapping.values()), pa.float64()), index)


def normalize(table: pa.Table, columns: Mapping[str, str], *, include_language: bool = False,
              extra_types: Mapping[str, pa.DataType] | None = None,
              value_maps: Mapping[str, Mapping[str, float]] | None = None) -> pa.Table:
    """A table of one input file -> the canonical columns (everything but `uid`) + extras.

    `columns` is `resolve_columns(file schema names)`; `extra_types` names input columns to carry
    through unchanged (cast to the given type; all-null when this file lacks them); `value_maps`: per
    canonical score column, a table from string tags to scores, used where the file stores strings there."""
    rows = table.num_rows
    arrays: list[pa.Array] = []
    names: list[str] = []
    wanted = ["URL", "TEXT", "WIDTH", "HEIGHT", "aesthetic", "punsafe", "pwatermark", "similarity"]
    if include_language:
        wanted.append("LANGUAGE")
    wanted.append("hash")
    for canonical in wanted:
        source = columns.get(canonical)
        if source is None or source not in table.column_names:
            arrays.append(pa.nulls(rows, CANONICAL_TYPES[canonical]))
        else:
            values = _column(table, source)
            label = source if source == canonical else f"{source} (as {canonical})"
            if pa.types.is_null(values.type):  # an all-null column written without a type
                arrays.append(pa.nulls(rows, CANONICAL_TYPES[canonical]))
            elif canonical in STRING_COLUMNS:
                arrays.append(_strings(values, label))
            elif canonical in SIZE_COLUMNS:
                arrays.append(_sizes(values, label))
            elif canonical in SCORE_COLUMNS and value_maps and canonical in value_maps and (
                    pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
                    or pa.types.is_dictionary(values.type) or pa.types.is_binary(values.type)):
                arrays.append(map_values(values, value_maps[canonical], label))
            elif canonical in SCORE_COLUMNS:
                arrays.append(_scores(values, label))
            else:
                arrays.append(_integers(values, label))
        names.append(canonical)
    for name, dtype in (extra_types or {}).items():
        if name in table.column_names:
            try:
                arrays.append(_column(table, name).cast(dtype))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(f"extra column {name!r}: cannot cast {table.schema.field(name).type} "
                                  f"to {dtype} ({exc})") from None
        else:
            arrays.append(pa.nulls(rows, dtype))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def source_columns(columns: Mapping[str, str], canonical: Sequence[str]) -> list[str]:
    """Input column names to read for the given canonical columns (those this file has)."""
    return [columns[name] for name in canonical if name in columns]


def conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """Select and cast to `target` (float32 scores are widened to the contract's float64)."""
    return table.select(target.names).cast(target)


def add_uid(table: pa.Table) -> pa.Table:
    """Prepend `uid` = 32 hex chars of BLAKE2b-128(URL + "\\x00" + TEXT) (null TEXT hashes as "").

    The uid is computed from the values written to the output, so anyone can recompute it from
    a row of `filtered/` (`hashlib.blake2b(f"{url}\\0{text}".encode(), digest_size=16).hexdigest()`).
    128 bits because the output must have unique uids: with 64 bits, ~10^8-10^9 rows would give
    a birthday collision with probability 1e-4..1e-2."""
    url = pc.fill_null(table.column("URL"), "")
    text = pc.fill_null(table.column("TEXT"), "")
    joined = pc.binary_join_element_wise(url, text, "\x00")
    return table.add_column(0, pa.field("uid", pa.string()), hashing.hex_digest(joined))


def strip_url(table: pa.Table) -> pa.Table:
    """Surrounding whitespace removed from URL (it breaks downloads and hides duplicates)."""
    index = table.column_names.index("URL")
    return table.set_column(index, "URL", pc.utf8_trim_whitespace(table.column("URL")))
