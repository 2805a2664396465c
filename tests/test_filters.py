"""Unit tests of data_filters: schema normalisation, each filter, funnel accounting, URL
normalisation, buckets and the de-dup tie rule. Pure pyarrow, no Ray."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from data_filters import dedup, filters, hashing, schema


def v1_table() -> pa.Table:
    """laion2B-en + LAION-Aesthetics V1 shape: int32 sizes, float32 `aesthetic`."""
    return pa.table({
        "URL": ["http://a.com/1.jpg", "https://b.org/2.png"],
        "TEXT": ["a red car", "two dogs"],
        "WIDTH": pa.array([640, 1024], pa.int32()),
        "HEIGHT": pa.array([480, None], pa.int32()),
        "similarity": pa.array([0.31, 0.29], pa.float64()),
        "hash": pa.array([123, -5], pa.int64()),
        "punsafe": pa.array([0.99, 0.1], pa.float32()),
        "pwatermark": pa.array([0.2, 0.6], pa.float32()),
        "aesthetic": pa.array([5.0, 6.25], pa.float32()),
    })


def v2_table() -> pa.Table:
    """improved_aesthetics V2 shape: float64 sizes (NaN), AESTHETIC_SCORE, pandas index column."""
    return pa.table({
        "URL": ["http://c.net/3.jpg", "http://d.net/4.jpg"],
        "TEXT": ["sunset over the sea", None],
        "WIDTH": pa.array([800.0, float("nan")]),
        "HEIGHT": pa.array([600.0, 512.4]),
        "similarity": [0.3, 0.33],
        "punsafe": [0.01, float("nan")],
        "pwatermark": [0.1, 0.2],
        "AESTHETIC_SCORE": [5.5, 4.9],
        "LANGUAGE": ["en", "de"],
        "__index_level_0__": [10, 11],
    })


def canonical(rows: dict) -> pa.Table:
    """A normalised table from python lists (missing canonical columns are filled in)."""
    n = len(next(iter(rows.values()))) if rows else 1
    full = {
        "URL": ["http://x.com/i.jpg"] * n, "TEXT": ["two words"] * n, "WIDTH": [1000] * n, "HEIGHT": [1000] * n,
        "aesthetic": [6.0] * n, "punsafe": [0.0] * n, "pwatermark": [0.0] * n, "similarity": [0.5] * n,
        "LANGUAGE": ["en"] * n, "hash": [0] * n,
    }
    full.update(rows)
    return pa.table({k: pa.array(v, schema.CANONICAL_TYPES[k]) for k, v in full.items()})


# ------------------------------------------------------------------------------------------- schema


def test_both_schema_variants_normalise_to_the_same_types():
    t1 = schema.normalize(v1_table(), schema.resolve_columns(v1_table().column_names))
    t2 = schema.normalize(v2_table(), schema.resolve_columns(v2_table().column_names), include_language=True)
    # Scores keep the file's float precision until conform(); then both are the contract.
    assert t1.schema.field("aesthetic").type == pa.float32()
    assert t2.schema.field("aesthetic").type == pa.float64()
    contract = schema.output_schema(include_language=True)
    out1 = schema.conform(schema.add_uid(schema.normalize(v1_table(), schema.resolve_columns(v1_table().column_names),
                                                          include_language=True)), contract)
    out2 = schema.conform(schema.add_uid(t2), contract)
    assert out1.schema == out2.schema == contract
    assert t1.column("aesthetic").to_pylist() == [5.0, 6.25]
    assert t2.column("aesthetic").to_pylist() == [5.5, 4.9]  # from AESTHETIC_SCORE
    assert "__index_level_0__" not in t2.column_names
    assert t1.column("hash").to_pylist() == [123, -5]
    assert t2.column("hash").to_pylist() == [None, None]  # absent in the file -> null column
    assert t2.column("LANGUAGE").to_pylist() == ["en", "de"]


def test_int_and_float_sizes_nan_and_null():
    t1 = schema.normalize(v1_table(), schema.resolve_columns(v1_table().column_names))
    t2 = schema.normalize(v2_table(), schema.resolve_columns(v2_table().column_names))
    assert t1.column("WIDTH").to_pylist() == [640, 1024]
    assert t1.column("HEIGHT").to_pylist() == [480, None]
    assert t2.column("WIDTH").to_pylist() == [800, None]  # NaN -> null
    assert t2.column("HEIGHT").to_pylist() == [600, 512]  # float rounded to int64
    assert t2.column("punsafe").to_pylist() == [0.01, None]  # NaN score -> null
    inf = pa.table({"URL": ["u"], "TEXT": ["t"], "WIDTH": [float("inf")], "HEIGHT": [1e300],
                    "aesthetic": [float("-inf")]})
    t3 = schema.normalize(inf, schema.resolve_columns(inf.column_names))
    assert t3.column("WIDTH").to_pylist() == [None]
    assert t3.column("HEIGHT").to_pylist() == [None]
    assert t3.column("aesthetic").to_pylist() == [None]


def test_float32_scores_compare_equal_to_their_decimal_threshold():
    # 0.99f widened is 0.9900000095 > 0.99: a row stored at exactly the threshold would be lost.
    t = schema.normalize(v1_table(), schema.resolve_columns(v1_table().column_names))
    assert t.column("punsafe").to_pylist()[0] > 0.99
    mask, _ = filters.apply_filters(t, filters.FiltersConfig(order=["unsafe"], **_only("unsafe")))
    assert mask.tolist() == [True, True]
    # One float32 step above the threshold is above it.
    next_up = np.nextafter(np.float32(0.99), np.float32(1), dtype=np.float32)
    t = canonical({})
    t = t.set_column(t.column_names.index("punsafe"), "punsafe", pa.array([next_up], pa.float32()))
    assert run_one("unsafe", t) == [False]


def _only(*names: str) -> dict:
    """Config kwargs enabling exactly the named filters."""
    out = {}
    for name in filters.REGISTRY:
        sub = getattr(filters.FiltersConfig(), name)
        out[name] = dataclasses.replace(sub, enabled=name in names)
    return out


def test_column_mapping_override_and_case_insensitive_aliases():
    t = pa.table({"url": ["http://a/b"], "Caption": ["x y"], "aesthetic": [4.0], "AESTHETIC_SCORE": [7.0]})
    assert schema.resolve_columns(t.column_names)["aesthetic"] == "AESTHETIC_SCORE"  # V2 preferred
    assert schema.resolve_columns(t.column_names)["TEXT"] == "Caption"
    chosen = schema.resolve_columns(t.column_names, {"aesthetic": "aesthetic"})
    assert schema.normalize(t, chosen).column("aesthetic").to_pylist() == [4.0]
    assert "WIDTH" not in chosen
    with pytest.raises(schema.SchemaError, match="unknown canonical column 'score'"):
        schema.resolve_columns(t.column_names, {"score": "x"})


def test_bad_column_type_names_the_column():
    t = pa.table({"URL": ["u"], "TEXT": ["t"], "WIDTH": ["wide"]})
    with pytest.raises(schema.SchemaError, match="'WIDTH'.*integer or float sizes"):
        schema.normalize(t, schema.resolve_columns(t.column_names))


def test_extra_columns_kept_and_null_filled():
    t = pa.table({"URL": ["u"], "TEXT": ["t"], "key": ["000001"]})
    out = schema.normalize(t, schema.resolve_columns(t.column_names), extra_types={"key": pa.string(),
                                                                                   "status": pa.int64()})
    assert out.column("key").to_pylist() == ["000001"]
    assert out.column("status").to_pylist() == [None]


def test_uid_is_blake2b_of_url_and_caption():
    t = schema.add_uid(canonical({"URL": ["http://a.com/x", "http://a.com/x"], "TEXT": ["cat", None]}))
    expected = [hashlib.blake2b(b"http://a.com/x\x00cat", digest_size=16).hexdigest(),
                hashlib.blake2b(b"http://a.com/x\x00", digest_size=16).hexdigest()]
    assert t.column("uid").to_pylist() == expected
    assert t.column_names[0] == "uid"
    # Stable across slicing/chunking.
    sliced = hashing.hex_digest(pa.chunked_array([pa.array(["a", "b"]), pa.array(["c"])]).slice(1))
    assert sliced.to_pylist() == [hashlib.blake2b(v, digest_size=16).hexdigest() for v in (b"b", b"c")]


# ------------------------------------------------------------------------------------------ filters


def run_one(name: str, table: pa.Table, **settings) -> list[bool]:
    cfg = filters.FiltersConfig(order=[name], **_only(name))
    setattr(cfg, name, dataclasses.replace(getattr(cfg, name), enabled=True, **settings))
    mask, steps = filters.apply_filters(table, cfg)
    assert sum(sum(s.removed.values()) for s in steps) + mask.sum() == table.num_rows
    return mask.tolist()


def test_url_filter():
    urls = ["http://a.com/x.jpg", "HTTPS://A.com/x", "  https://a.com/y  ", "ftp://a.com/x", "http:///nohost",
            "a.com/x.jpg", "http://" + "a" * 3000, "data:image/png;base64,AAA"]
    assert run_one("url", canonical({"URL": urls})) == [True, True, True, False, False, False, False, False]
    assert run_one("url", canonical({"URL": ["ftp://a.com/x"]}), schemes=["ftp"]) == [True]
    assert run_one("url", canonical({"URL": ["http://ab.com/" + "x" * 20]}), max_length=20) == [False]


def test_size_filters():
    t = canonical({"WIDTH": [512, 511, 4096, 4097, 2000, 0], "HEIGHT": [600, 2000, 1000, 1000, 500, 0]})
    assert run_one("min_side", t) == [True, False, True, True, False, False]
    assert run_one("max_side", t) == [True, True, True, False, True, True]
    ratios = canonical({"WIDTH": [900, 300, 901, 100, 0], "HEIGHT": [300, 900, 300, 100, 5]})
    assert run_one("aspect_ratio", ratios, max=3.0) == [True, True, False, True, False]
    assert run_one("min_side", t, min=100) == [True, True, True, True, True, False]


def test_score_filters():
    t = canonical({"aesthetic": [5.0, 4.99, 9.0], "pwatermark": [0.5, 0.51, 0.0], "punsafe": [0.99, 0.991, 1.0],
                   "similarity": [0.28, 0.2799, 0.3]})
    assert run_one("aesthetic", t) == [True, False, True]
    assert run_one("aesthetic", t, min=6.0) == [False, False, True]
    assert run_one("watermark", t) == [True, False, True]
    assert run_one("unsafe", t) == [True, False, False]
    assert run_one("similarity", t) == [True, False, True]


def test_caption_filters():
    texts = ["two words", "one", "   ", "", "tab\tseparated", "  lead  trail  ", "www.shop.com sale", "A.COM deal"]
    t = canonical({"TEXT": texts})
    assert run_one("caption_empty", t) == [True, True, False, False, True, True, True, True]
    assert run_one("caption_words", t) == [True, False, False, False, True, True, True, True]
    assert run_one("caption_words", t, min=3) == [False] * 8
    assert run_one("caption_words", canonical({"TEXT": ["a b c", "a b"]}), min=3) == [True, False]
    assert run_one("caption_forbidden", t, substrings=["www.", ".com"]) == [True, True, True, True, True, True,
                                                                            False, False]
    # "." is matched literally, not as a regex wildcard; case-sensitive when asked.
    assert run_one("caption_forbidden", canonical({"TEXT": ["axcom", "A.COM"]}), substrings=[".com"],
                   ignore_case=False) == [True, True]


def test_language_filter():
    t = canonical({"LANGUAGE": ["en", "de", "EN", None]})
    mask = run_one("language", t, allowed=["en", "de"])
    assert mask == [True, True, False, False]


def test_nulls_are_attributed_to_the_first_filter_needing_the_column():
    t = canonical({"WIDTH": [None, 1000, 100, 1000, 1000], "HEIGHT": [1000, None, 1000, 1000, 1000],
                   "aesthetic": [6.0, 6.0, 6.0, None, 3.0]})
    cfg = filters.FiltersConfig()
    mask, steps = filters.apply_filters(t, cfg)
    by_name = {s.name: s.removed for s in steps}
    assert by_name["min_side"] == {"null_WIDTH": 1, "null_HEIGHT": 1, "min_side": 1}
    assert by_name["max_side"] == {"max_side": 0}  # its columns' nulls were already counted
    assert by_name["aesthetic"] == {"null_aesthetic": 1, "aesthetic": 1}
    assert mask.tolist() == [False, False, False, False, False]
    assert sum(sum(s.removed.values()) for s in steps) == 5


def test_nan_score_is_removed_as_null_not_as_low_score():
    raw = pa.table({"URL": ["http://a.com/1", "http://a.com/2"], "TEXT": ["a b", "a b"], "WIDTH": [600, 600],
                    "HEIGHT": [600, 600], "AESTHETIC_SCORE": [float("nan"), 7.0], "punsafe": [0.0, 0.0],
                    "pwatermark": [0.0, 0.0]})
    t = schema.normalize(raw, schema.resolve_columns(raw.column_names))
    mask, steps = filters.apply_filters(t, filters.FiltersConfig())
    assert mask.tolist() == [False, True]
    assert {s.name: s.removed for s in steps}["aesthetic"] == {"null_aesthetic": 1, "aesthetic": 0}


def test_order_decides_attribution_and_counts_always_add_up():
    rng = np.random.default_rng(0)
    n = 2000
    t = canonical({"WIDTH": rng.integers(100, 5000, n).tolist(), "HEIGHT": rng.integers(100, 5000, n).tolist(),
                   "aesthetic": rng.uniform(3, 8, n).tolist(),
                   "TEXT": [random.Random(i).choice(["one", "two words", "", None, "three word caption"])
                            for i in range(n)]})
    default = filters.FiltersConfig()
    reordered = filters.FiltersConfig(order=list(reversed(default.order)))
    mask_a, steps_a = filters.apply_filters(t, default)
    mask_b, steps_b = filters.apply_filters(t, reordered)
    assert (mask_a == mask_b).all()  # same survivors whatever the order...
    removed_a = {s.name: sum(s.removed.values()) for s in steps_a}
    removed_b = {s.name: sum(s.removed.values()) for s in steps_b}
    assert removed_a != removed_b  # ...but attributed differently
    for steps, mask in ((steps_a, mask_a), (steps_b, mask_b)):
        assert sum(sum(s.removed.values()) for s in steps) + mask.sum() == n
    # The compaction of the working table (most rows gone) must not shift the mask.
    expected = [
        (w is not None and h is not None and min(w, h) >= 512 and max(w, h) <= 4096 and a >= 5.0
         and txt is not None and len(txt.split()) >= 2)
        for w, h, a, txt in zip(*(t.column(c).to_pylist() for c in ("WIDTH", "HEIGHT", "aesthetic", "TEXT")))
    ]
    assert mask_a.tolist() == expected


def test_config_problems_name_the_key():
    cfg = filters.FiltersConfig(order=["min_side", "bogus", "min_side"])
    problems = cfg.problems()
    assert any("order[1]: unknown filter 'bogus'" in p for p in problems)
    assert any("order[2]: filter 'min_side' listed twice" in p for p in problems)
    assert any("filter 'aesthetic' is enabled but not listed" in p for p in problems)
    assert filters.FiltersConfig().problems() == []


# -------------------------------------------------------------------------------------------- dedup


def test_url_normalisation():
    urls = ["  HTTP://Example.COM/Path/IMG.jpg#frag ", "http://example.com/Path/IMG.jpg",
            "https://User@Host.COM:8080/a?Q=1#x", "http://example.com/path/img.jpg", None, "no-scheme.com/A#b"]
    assert dedup.normalize_url(pa.array(urls)).to_pylist() == [
        "http://example.com/Path/IMG.jpg", "http://example.com/Path/IMG.jpg", "https://user@host.com:8080/a?Q=1",
        "http://example.com/path/img.jpg", None, "no-scheme.com/A"]


def test_buckets_are_stable_and_in_range():
    keys = pa.array([f"http://h{i}.com/x" for i in range(1000)])
    buckets = dedup.bucket_of(keys, 7)
    assert buckets.min() >= 0 and buckets.max() < 7
    assert len(set(buckets.tolist())) == 7
    again = dedup.bucket_of(pa.array(["http://h5.com/x"]), 7)
    assert again[0] == buckets[5]
    # Pinned: a change here re-buckets existing outputs (and changes part contents).
    digest = hashlib.blake2b(b"http://h5.com/x", digest_size=8).digest()
    assert buckets[5] == int.from_bytes(digest, "big") % 7


def rows_for_dedup() -> pa.Table:
    t = canonical({
        "URL": ["http://A.com/x#1", "http://a.com/x", "http://a.com/x", "http://a.com/x#2",
                "http://b.com/y", "http://b.com/y", "http://c.com/z", "http://d.com/w", "http://d.com/w"],
        "TEXT": ["zebra", "apple", "banana", "aardvark", "same", "same", "only", "with score", "no score"],
        "aesthetic": [6.0, 7.0, 7.0, 6.5, 5.0, 5.0, 5.5, 5.0, None],
        "WIDTH": [1, 2, 3, 4, 5, 6, 7, 8, 9],
    })
    t = schema.add_uid(t)
    return t.append_column(dedup.SOURCE_POSITION, pa.array(range(t.num_rows), pa.int64()))


def test_tie_rule_highest_aesthetic_then_smallest_caption():
    result = dedup.keep_best(rows_for_dedup())
    kept = {u: (t, w) for u, t, w in zip(*(result.kept.column(c).to_pylist() for c in ("URL", "TEXT", "WIDTH")))}
    assert kept["http://a.com/x"] == ("apple", 2)  # 7.0 beats 6.x; tie at 7.0 -> "apple" < "banana"
    assert kept["http://b.com/y"] == ("same", 5)  # full tie -> earliest input position
    assert kept["http://c.com/z"] == ("only", 7)
    assert kept["http://d.com/w"] == ("with score", 8)  # a score beats no score
    assert result.removed == 5
    dups = result.duplicates(rows_for_dedup())
    table = rows_for_dedup()
    uid_of = dict(zip(table.column("TEXT").to_pylist(), table.column("uid").to_pylist()))
    pairs = set(zip(dups.column("uid").to_pylist(), dups.column("kept_uid").to_pylist()))
    assert (uid_of["zebra"], uid_of["apple"]) in pairs
    assert (uid_of["no score"], uid_of["with score"]) in pairs


def test_dedup_result_does_not_depend_on_input_order():
    table = rows_for_dedup()
    expected = dedup.keep_best(table).kept
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(table.num_rows)
        assert dedup.keep_best(table.take(pa.array(order))).kept.equals(expected)


def test_null_urls_are_never_duplicates():
    t = schema.add_uid(canonical({"URL": [None, None, "http://a/b"], "TEXT": ["a", "b", "c"]}))
    assert dedup.keep_best(t).kept.num_rows == 3




def _longest_host_run(urls: list[str]) -> int:
    hosts = [u.split("/")[2] for u in urls]
    longest = run = 1
    for a, b in zip(hosts, hosts[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    return longest


def test_kept_rows_are_spread_over_hosts_in_a_uid_hash_order():
    """Issue 19: keep_best returns rows grouped by normalised URL, i.e. by host; a download shard cut from that
    sends every thread to one host. spread_order puts them in a uid-hash order that spreads the hosts."""
    rng = random.Random(0)
    urls = [f"http://host-{h}.example.com/img/{rng.randrange(10**9)}.jpg" for h in range(4) for _ in range(150)]
    rng.shuffle(urls)  # the input interleaves hosts
    table = pa.table({"URL": urls, "TEXT": [f"a caption {i}" for i in range(600)],
                      "aesthetic": [6.0] * 600, "uid": [f"uid-{i:04d}" for i in range(600)]})
    kept = dedup.keep_best(table).kept
    assert _longest_host_run(kept.column("URL").to_pylist()) == 150  # the failure mode: one host at a time
    spread = dedup.spread_order(kept)
    assert _longest_host_run(spread.column("URL").to_pylist()) <= 10
    assert sorted(spread.column("uid").to_pylist()) == sorted(table.column("uid").to_pylist())
    # Deterministic: a function of the uids alone, whatever order the rows come in.
    assert dedup.spread_order(kept.take(pa.array(np.arange(599, -1, -1)))).equals(spread)
    hashes = hashing.hash64(spread.column("uid"))
    assert (np.diff(hashes.astype(np.float64)) >= 0).all()
