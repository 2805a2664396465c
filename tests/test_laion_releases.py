"""LAION as published (issue 20): each release's column layout, generated here, filters end to end -- the
laion2B-en metadata joined with aesthetic tag files on `hash` (streaming, bucketed), LAION-400M's NSFW tags
mapped to punsafe, LAION-Aesthetics' AESTHETIC_SCORE, laion2B-multi's LANGUAGE -- with the funnel exact
against a plain-Python reference; a file lacking several needed columns names all of them at once."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import filter as filter_phase

pytestmark = pytest.mark.e2e
N = 240


def _rows(seed: int, n: int = N) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "URL": [f"http://host{i % 9}.example/{seed}/{i}.jpg" if i % 37 else f"http://dup.example/{i % 3}.jpg"
                for i in range(n)],
        "TEXT": [f"a photo of thing {i}" if i % 13 else "x" for i in range(n)],
        "WIDTH": rng.choice([256, 600, 1024, 5000], n).astype(np.int64),
        "HEIGHT": rng.choice([300, 640, 1024], n).astype(np.int64),
        "similarity": rng.uniform(0.2, 0.4, n),
        "hash": rng.integers(-2**62, 2**62, n),
        "punsafe": rng.choice([0.0, 0.5, 0.995], n).astype(np.float32),
        "pwatermark": rng.choice([0.1, 0.7], n).astype(np.float32),
        "aesthetic": rng.choice([4.0, 5.5, 6.5], n).astype(np.float32),
        "LANGUAGE": rng.choice(["en", "de"], n),
        "NSFW": rng.choice(["UNLIKELY", "UNSURE", "NSFW", "???"], n),
    }


def _write(path: str, rows: dict, columns: dict[str, str]) -> None:
    """rows' columns under the release's names (`columns`: release name -> generated column)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({name: rows[source] for name, source in columns.items()}), path)


def _reference(rows: dict, *, aesthetic: list | None, punsafe: list, watermark: bool, language=None) -> tuple[dict, set]:
    """(removed per reason, surviving (URL, TEXT)) with the default filter order and thresholds."""
    removed: dict[str, int] = {}
    kept = []
    for i in range(len(rows["URL"])):
        w, h = rows["WIDTH"][i], rows["HEIGHT"][i]
        checks = [("min_side", min(w, h) >= 512), ("max_side", max(w, h) <= 4096)]
        if aesthetic is not None:
            checks.append(("null_aesthetic", aesthetic[i] is not None))
            checks.append(("aesthetic", aesthetic[i] is not None and aesthetic[i] >= 5.0))
        if watermark:
            checks.append(("watermark", rows["pwatermark"][i] <= np.float32(0.5)))
        checks.append(("null_punsafe", punsafe[i] is not None))
        checks.append(("unsafe", punsafe[i] is not None and np.float32(punsafe[i]) <= np.float32(0.99)))
        checks += [("caption_words", len(rows["TEXT"][i].split()) >= 2)]
        if language:
            checks.append(("language", rows["LANGUAGE"][i] in language))
        reason = next((name for name, ok in checks if not ok), None)
        if reason:
            removed[reason] = removed.get(reason, 0) + 1
        else:
            kept.append((rows["URL"][i], rows["TEXT"][i]))
    return removed, set(kept)


def _run(tmp_path, inputs, *extra: str):
    return filter_phase.main(["--input", inputs, "--output", str(tmp_path / "out"), "--set", f"data_root={tmp_path}",
                              "--set", "mlflow.enabled=false", "--set", "dedup.num_buckets=2",
                              *[a for e in extra for a in ("--set", e)]])


def _removed(funnel: dict) -> dict:
    return {r: c for s in funnel["filters"] for r, c in s["removed"].items() if c}


def _survivors(out: str) -> set:
    parts = [pq.read_table(os.path.join(out, f)) for f in sorted(os.listdir(out)) if f.startswith("part-")]
    table = pa.concat_tables(parts)
    return set(zip(table.column("URL").to_pylist(), table.column("TEXT").to_pylist()))


def test_laion2b_en_joined_with_aesthetic_tag_files_on_hash(embedded_ray, tmp_path):
    rows = _rows(0)
    meta = {"URL": "URL", "TEXT": "TEXT", "WIDTH": "WIDTH", "HEIGHT": "HEIGHT", "similarity": "similarity",
            "hash": "hash", "punsafe": "punsafe", "pwatermark": "pwatermark"}
    half = {k: v[:N // 2] for k, v in rows.items()}
    rest = {k: v[N // 2:] for k, v in rows.items()}
    _write(str(tmp_path / "laion2B-en" / "part-00000.parquet"), half, meta)
    _write(str(tmp_path / "laion2B-en" / "part-00001.parquet"), rest, meta)
    # Aesthetic tags in two files under another column name: every 5th hash has no tag, one key is listed
    # twice (its first row counts), rows in another order than the metadata.
    tagged = [i for i in range(N) if i % 5]
    order = np.random.default_rng(1).permutation(tagged)
    tags = {"hash": rows["hash"][order], "AESTHETIC_SCORE": rows["aesthetic"][order]}
    first = {k: v[:100] for k, v in tags.items()}
    second = {"hash": np.concatenate([tags["hash"][100:], tags["hash"][:1]]),
              "AESTHETIC_SCORE": np.concatenate([tags["AESTHETIC_SCORE"][100:], np.float32([0.5])])}
    _write(str(tmp_path / "aesthetic" / "a.parquet"), first, {"hash": "hash", "AESTHETIC_SCORE": "AESTHETIC_SCORE"})
    _write(str(tmp_path / "aesthetic" / "b.parquet"), second, {"hash": "hash", "AESTHETIC_SCORE": "AESTHETIC_SCORE"})

    result = _run(tmp_path, str(tmp_path / "laion2B-en"), f"tags=[{{input: {tmp_path / 'aesthetic'}, key: hash, "
                  "columns: [aesthetic]}]", "join.num_buckets=3")
    funnel = result.details["funnel"]
    aesthetic = [float(rows["aesthetic"][i]) if i % 5 else None for i in range(N)]
    expected, survivors = _reference(rows, aesthetic=aesthetic, punsafe=list(rows["punsafe"]), watermark=True)
    assert funnel["rows_read"] == N and _removed(funnel) == expected
    assert funnel["join"]["duplicate_tag_keys"] == [1] and funnel["join"]["metadata_rows"] == N
    assert funnel["join"]["metadata_rows_with_tags"] == [len(tagged)] and funnel["files"]["read"] == 2
    # The output: one row per distinct surviving URL (the URL de-dup keeps one copy), each a surviving row.
    output = _survivors(result.output)
    assert output <= survivors and {u for u, _ in output} == {u for u, _ in survivors}
    assert len(output) == len({u for u, _ in survivors}) == funnel["rows_written"]
    # Same files, different bucket count: the same output (the join's buckets are not part of the version).
    again = filter_phase.main(["--input", str(tmp_path / "laion2B-en"), "--output", str(tmp_path / "out2"),
                               "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false",
                               "--set", "dedup.num_buckets=2", "--set", "join.num_buckets=1", "--set",
                               f"tags=[{{input: {tmp_path / 'aesthetic'}, key: hash, columns: [aesthetic]}}]"])
    assert again.version == result.version and _survivors(again.output) == _survivors(result.output)


def test_laion400m_nsfw_tags_map_to_punsafe(embedded_ray, tmp_path):
    rows = _rows(2)
    _write(str(tmp_path / "laion400m" / "part-00000.parquet"), {**rows, "SAMPLE_ID": np.arange(N), "LICENSE": ["?"] * N},
           {"SAMPLE_ID": "SAMPLE_ID", "URL": "URL", "TEXT": "TEXT", "HEIGHT": "HEIGHT", "WIDTH": "WIDTH",
            "LICENSE": "LICENSE", "NSFW": "NSFW", "similarity": "similarity"})
    result = _run(tmp_path, str(tmp_path / "laion400m"), "filters.aesthetic.enabled=false",
                  "filters.watermark.enabled=false", "schema.extra_columns=[SAMPLE_ID]")
    mapping = {"UNLIKELY": 0.0, "UNSURE": 0.5, "NSFW": 1.0}
    expected, _ = _reference(rows, aesthetic=None, punsafe=[mapping.get(t) for t in rows["NSFW"]], watermark=False)
    funnel = result.details["funnel"]
    assert _removed(funnel) == expected and expected["unsafe"] > 0 and expected["null_punsafe"] > 0
    out = pq.read_table(os.path.join(result.output, sorted(f for f in os.listdir(result.output)
                                                            if f.startswith("part-"))[0]))
    assert "SAMPLE_ID" in out.column_names


def test_laion_aesthetics_v2_and_laion2b_multi_layouts(embedded_ray, tmp_path):
    rows = _rows(3)
    _write(str(tmp_path / "aesthetics" / "part-00000.parquet"), rows,
           {"URL": "URL", "TEXT": "TEXT", "WIDTH": "WIDTH", "HEIGHT": "HEIGHT", "similarity": "similarity",
            "punsafe": "punsafe", "pwatermark": "pwatermark", "AESTHETIC_SCORE": "aesthetic", "hash": "hash"})
    result = _run(tmp_path, str(tmp_path / "aesthetics"))
    expected, _ = _reference(rows, aesthetic=[float(a) for a in rows["aesthetic"]], punsafe=list(rows["punsafe"]),
                             watermark=True)
    assert _removed(result.details["funnel"]) == expected

    multi = tmp_path / "multi"
    _write(str(multi / "laion2B-multi" / "part-00000.parquet"), rows,
           {"URL": "URL", "TEXT": "TEXT", "WIDTH": "WIDTH", "HEIGHT": "HEIGHT", "similarity": "similarity",
            "LANGUAGE": "LANGUAGE", "hash": "hash", "punsafe": "punsafe", "pwatermark": "pwatermark"})
    _write(str(multi / "tags" / "t.parquet"), rows, {"hash": "hash", "aesthetic": "aesthetic"})
    result = filter_phase.main(["--input", str(multi / "laion2B-multi"), "--output", str(multi / "out"),
                                "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false",
                                "--set", f"tags=[{{input: {multi / 'tags'}, columns: [aesthetic]}}]",
                                "--set", "filters.language.enabled=true", "--set", "filters.language.allowed=[en]"])
    expected, _ = _reference(rows, aesthetic=[float(a) for a in rows["aesthetic"]], punsafe=list(rows["punsafe"]),
                             watermark=True, language=["en"])
    assert _removed(result.details["funnel"]) == expected and expected["language"] > 0


def test_every_missing_column_is_named_at_once_with_its_key(embedded_ray, tmp_path):
    rows = _rows(4)
    _write(str(tmp_path / "bare" / "part-00000.parquet"), rows,
           {"URL": "URL", "TEXT": "TEXT", "WIDTH": "WIDTH", "HEIGHT": "HEIGHT", "hash": "hash"})
    with pytest.raises(filter_phase.FilterInputError) as err:
        _run(tmp_path, str(tmp_path / "bare"))
    message = str(err.value)
    assert "3 needed column(s) missing" in message
    for column, key in (("aesthetic", "filters.aesthetic.enabled=false"), ("pwatermark", "filters.watermark.enabled=false"),
                        ("punsafe", "filters.unsafe.enabled=false")):
        assert f"column {column!r} is missing" in message and key in message
    with pytest.raises(filter_phase.FilterInputError, match=r"tags\[0\]: .* lacks key column 'hash'"):
        _write(str(tmp_path / "badtags" / "t.parquet"), rows, {"id": "hash", "aesthetic": "aesthetic"})
        _run(tmp_path, str(tmp_path / "bare"), f"tags=[{{input: {tmp_path / 'badtags'}, columns: [aesthetic]}}]",
             "filters.watermark.enabled=false", "filters.unsafe.enabled=false")
