"""The filter phase on generated LAION-like files: one embedded Ray for the module, MLflow in a
temp SQLite store, and one end-to-end run submitted with `ray job submit` to a local head."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_filters import dedup, schema
from pipelines import config as config_lib
from pipelines import filter as filter_phase
from pipelines import filter_tasks
from pipelines import manifest, tracking
from pipelines.config import ConfigError

pytestmark = pytest.mark.e2e

AESTHETICS = [3.0, 4.5, 4.75, 5.0, 5.25, 6.0, 7.5]  # exact in float32: no precision edge cases here
CAPTIONS = ["a red car on a road", "two dogs", "one", "  ", None, "sunset over the sea", "b a", "a b"]


# ------------------------------------------------------------------------------------ input data


def laion_rows(seed: int, count: int, shared_urls: list[str]) -> dict:
    """Python rows of a LAION-like file; about a quarter of the URLs come from `shared_urls`
    (spelled with other host case / a fragment, so only URL normalisation finds them)."""
    rng = np.random.default_rng(seed)
    urls, widths, heights, texts = [], [], [], []
    for i in range(count):
        if shared_urls and rng.random() < 0.25:
            url = shared_urls[int(rng.integers(len(shared_urls)))]
            if rng.random() < 0.5:
                url = url.replace("http://img", "HTTP://IMG") + "#frag"
        elif rng.random() < 0.03:
            url = f"ftp://files{seed}.net/{i}.jpg"
        else:
            url = f"http://img{seed}-{i}.example.com/p/{i}.JPG"
        urls.append(url)
        widths.append(int(rng.choice([256, 512, 800, 1024, 5000])))
        heights.append(int(rng.choice([300, 512, 768, 2048])))
        texts.append(CAPTIONS[int(rng.integers(len(CAPTIONS)))])
    return {
        "URL": urls, "TEXT": texts, "WIDTH": widths, "HEIGHT": heights,
        "aesthetic": [float(rng.choice(AESTHETICS)) for _ in range(count)],
        "punsafe": [float(rng.choice([0.0, 0.5, 1.0])) for _ in range(count)],
        "pwatermark": [float(rng.choice([0.125, 0.5, 0.75])) for _ in range(count)],
        "similarity": [float(rng.choice([0.25, 0.3])) for _ in range(count)],
    }


def write_v1(path: str, rows: dict, null_every: int = 17) -> None:
    """laion2B-en + aesthetic V1: int32 sizes, float32 `aesthetic`, nulls in WIDTH."""
    n = len(rows["URL"])
    width = pa.array([None if i % null_every == 3 else w for i, w in enumerate(rows["WIDTH"])], pa.int32())
    table = pa.table({
        "URL": rows["URL"], "TEXT": rows["TEXT"], "WIDTH": width, "HEIGHT": pa.array(rows["HEIGHT"], pa.int32()),
        "similarity": rows["similarity"], "hash": pa.array(range(n), pa.int64()),
        "punsafe": pa.array(rows["punsafe"], pa.float32()), "pwatermark": pa.array(rows["pwatermark"], pa.float32()),
        "aesthetic": pa.array(rows["aesthetic"], pa.float32()),
    })
    pq.write_table(table, path, row_group_size=50)


def write_v2(path: str, rows: dict, nan_every: int = 13) -> None:
    """improved_aesthetics V2: float64 sizes with NaN, AESTHETIC_SCORE with NaN, pandas index, LANGUAGE."""
    n = len(rows["URL"])
    height = [float("nan") if i % nan_every == 5 else float(h) for i, h in enumerate(rows["HEIGHT"])]
    score = [float("nan") if i % nan_every == 7 else a for i, a in enumerate(rows["aesthetic"])]
    table = pa.table({
        "URL": rows["URL"], "TEXT": rows["TEXT"], "WIDTH": pa.array(rows["WIDTH"], pa.float64()),
        "HEIGHT": height, "similarity": rows["similarity"], "punsafe": rows["punsafe"],
        "pwatermark": rows["pwatermark"], "AESTHETIC_SCORE": score, "LANGUAGE": ["en"] * n,
        "__index_level_0__": list(range(n)),
    })
    pq.write_table(table, path, row_group_size=50)


def read_back(path: str) -> list[dict]:
    """Rows of an input file as the reference implementation sees them (NaN -> None)."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    out = []
    for row in rows:
        def num(value):
            return None if value is None or (isinstance(value, float) and np.isnan(value)) else value
        out.append({
            "URL": row["URL"], "TEXT": row["TEXT"], "WIDTH": num(row["WIDTH"]), "HEIGHT": num(row["HEIGHT"]),
            "aesthetic": num(row.get("aesthetic", row.get("AESTHETIC_SCORE"))),
            "punsafe": num(row["punsafe"]), "pwatermark": num(row["pwatermark"]),
        })
    return out


# ------------------------------------------------------------------------- reference implementation


def reference(rows: list[dict], aesthetic_min: float = 5.0) -> tuple[dict, set[str]]:
    """Plain-Python funnel and surviving uids, written independently of data_filters."""
    removed: dict[str, int] = {}
    survivors = []

    def drop(reason):
        removed[reason] = removed.get(reason, 0) + 1

    for r in rows:
        w, h = r["WIDTH"], r["HEIGHT"]
        if w is None:
            drop("null_WIDTH")
        elif h is None:
            drop("null_HEIGHT")
        elif min(w, h) < 512:
            drop("min_side")
        elif max(w, h) > 4096:
            drop("max_side")
        elif r["aesthetic"] is None:
            drop("null_aesthetic")
        elif r["aesthetic"] < aesthetic_min:
            drop("aesthetic")
        elif r["pwatermark"] > 0.5:
            drop("watermark")
        elif r["punsafe"] > 0.99:
            drop("unsafe")
        elif not re.match(r"^(http|https)://[^/?#\s]+", r["URL"].strip(), re.I):
            drop("url")
        elif r["TEXT"] is None:
            drop("null_TEXT")
        elif not r["TEXT"].strip():
            drop("caption_empty")
        elif len(r["TEXT"].split()) < 2:
            drop("caption_words")
        else:
            survivors.append(r)

    def key(url):
        url = url.strip().split("#", 1)[0]
        scheme_host, sep, rest = url.partition("://")
        host, slash, path = rest.partition("/")
        return f"{scheme_host.lower()}{sep}{host.lower()}{slash}{path}"

    best: dict[str, dict] = {}
    for r in survivors:
        k = key(r["URL"])
        current = best.get(k)
        rank = (-r["aesthetic"], r["TEXT"], r["URL"].strip())
        if current is None or rank < (-current["aesthetic"], current["TEXT"], current["URL"].strip()):
            best[k] = r
    uids = {hashlib.blake2b(f"{r['URL'].strip()}\x00{r['TEXT']}".encode(), digest_size=16).hexdigest()
            for r in best.values()}
    removed["duplicates"] = len(survivors) - len(best)
    return removed, uids


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def laion_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("laion")
    shared = [f"http://img-shared-{i}.example.com/p/{i}.jpg" for i in range(40)]
    write_v1(str(base / "part-00000-v1.parquet"), laion_rows(1, 300, shared))
    os.makedirs(base / "sub")
    write_v2(str(base / "sub" / "part-00001-v2.parquet"), laion_rows(2, 250, shared))
    return str(base)


def all_input_rows(laion_dir: str) -> list[dict]:
    return (read_back(os.path.join(laion_dir, "part-00000-v1.parquet"))
            + read_back(os.path.join(laion_dir, "sub", "part-00001-v2.parquet")))


def run_phase(input_uri: str, output: str, tmp_path, *extra: str, mlflow: bool = False) -> dict:
    args = ["--input", input_uri, "--output", output, "--set", f"data_root={tmp_path}",
            "--set", "dedup.num_buckets=3", "--set", "read.rows_per_task=100",
            "--set", f"mlflow.enabled={'true' if mlflow else 'false'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "--set", "mlflow.system_metrics=false"]
    return filter_phase.main(args + [item for pair in (("--set", e) for e in extra) for item in pair])


def read_output(out_dir: str) -> pa.Table:
    parts = sorted(f for f in os.listdir(out_dir) if f.startswith("part-"))
    return pa.concat_tables([pq.read_table(os.path.join(out_dir, p)) for p in parts])


def funnel_adds_up(funnel: dict) -> bool:
    removed = sum(step["removed_total"] for step in funnel["filters"])
    return (funnel["rows_read"] - removed == funnel["rows_after_filters"]
            and funnel["rows_after_filters"] - funnel["duplicates_removed"] == funnel["rows_written"])


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.slow_e2e  # the workflow test submits the filter as a Ray job too; this adds the reference check
def test_submitted_as_ray_job(ray_cluster, laion_dir, tmp_path):
    # First in the module: the cluster starts before this module's embedded Ray exists.
    out = tmp_path / "out"
    status, logs = ray_cluster.submit(
        [sys.executable, "-m", "pipelines.filter", "--input", laion_dir, "--output", str(out),
         "--set", "dedup.num_buckets=2", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
        timeout=400)
    assert status == "SUCCEEDED", logs
    (version,) = os.listdir(out)
    funnel = json.load(open(out / version / "funnel.json"))
    assert funnel["rows_read"] == 550 and funnel_adds_up(funnel)
    _, expected_uids = reference(all_input_rows(laion_dir))
    assert set(read_output(str(out / version)).column("uid").to_pylist()) == expected_uids
    runs = tracking.find_runs("filter", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert runs and runs[0].data.metrics["rows_written"] == funnel["rows_written"]


def test_phase_matches_reference_and_logs_mlflow(embedded_ray, laion_dir, tmp_path):
    summary = run_phase(laion_dir, str(tmp_path / "out"), tmp_path, mlflow=True)
    out_dir = summary.output
    funnel = summary.details["funnel"]
    expected_removed, expected_uids = reference(all_input_rows(laion_dir))

    assert funnel["rows_read"] == 550
    assert funnel_adds_up(funnel)
    got_removed = {reason: count for step in funnel["filters"] for reason, count in step["removed"].items() if count}
    assert got_removed == {k: v for k, v in expected_removed.items() if k != "duplicates" and v}
    assert funnel["duplicates_removed"] == expected_removed["duplicates"] > 0
    assert [s["filter"] for s in funnel["filters"]] == ["min_side", "max_side", "aesthetic", "watermark", "unsafe",
                                                       "url", "caption_empty", "caption_words"]

    table = read_output(out_dir)
    assert set(table.column("uid").to_pylist()) == expected_uids
    assert table.num_rows == funnel["rows_written"] == len(expected_uids)
    # Each part is in uid-hash order (hosts spread over the download's shards), not grouped by URL.
    for part in sorted(f for f in os.listdir(out_dir) if f.startswith("part-")):
        written_part = pq.read_table(os.path.join(out_dir, part))
        assert written_part.num_rows > 1 and written_part.equals(dedup.spread_order(written_part)), part
    assert table.schema == schema.output_schema(include_language=True)  # the V2 file has LANGUAGE
    assert not os.path.exists(os.path.join(out_dir, filter_phase.TMP_DIR))

    # Duplicates across files: the kept copy of each shared URL has the best score of all copies.
    dups = pa.concat_tables([pq.read_table(os.path.join(out_dir, "duplicates", f))
                             for f in sorted(os.listdir(os.path.join(out_dir, "duplicates")))])
    assert dups.num_rows == funnel["duplicates_removed"]
    assert set(dups.column("kept_uid").to_pylist()) <= expected_uids

    written = manifest.read(out_dir)
    assert written["counts"]["rows_written"] == funnel["rows_written"]
    assert sum(p["rows"] for p in written["parts"]) == funnel["rows_written"]
    assert json.load(open(os.path.join(out_dir, "funnel.json")))["rows_written"] == funnel["rows_written"]

    runs = tracking.find_runs("filter", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert len(runs) == 1 and runs[0].info.run_id == written["mlflow_run_id"]
    metrics = runs[0].data.metrics
    assert metrics["rows_read"] == 550
    assert metrics["rows_written"] == funnel["rows_written"]
    assert metrics["duplicates_removed"] == funnel["duplicates_removed"]
    assert metrics["removed.null_WIDTH"] == expected_removed["null_WIDTH"]
    assert metrics["removed.aesthetic"] == expected_removed["aesthetic"]
    assert metrics["rows_after.aesthetic"] == next(s["rows_after"] for s in funnel["filters"] if s["filter"] == "aesthetic")
    check_report(out_dir, funnel, tmp_path, runs[0])


def check_report(out_dir: str, funnel: dict, tmp_path, run) -> None:
    """report/: the chart's numbers are the funnel's, histograms count every input row, sampled rows fail their
    filter; in MLflow: the report artifacts, the input and output datasets, the experiment's description."""
    from PIL import Image

    from pipelines import reports

    folder = os.path.join(out_dir, reports.REPORT_DIR)
    report = json.load(open(os.path.join(folder, reports.REPORT_JSON)))
    stages = [tuple(s) for s in report["funnel_stages"]]
    assert stages[0] == ("rows read", funnel["rows_read"]) and stages[-1] == ("written", funnel["rows_written"])
    assert stages[1:-2] == [(f"after {s['filter']}", s["rows_after"]) for s in funnel["filters"]]
    assert stages[-2] == ("after de-dup", funnel["rows_after_filters"] - funnel["duplicates_removed"])
    for name in ("funnel.png", "hist-aesthetic.png", "hist-WIDTH.png", reports.REPORT_HTML):
        assert os.path.getsize(os.path.join(folder, name)) > 1000, name
    with Image.open(os.path.join(folder, "funnel.png")) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    for column, hist in report["histograms"].items():  # every input row: in a bin, outside the range, or null
        assert sum(hist["counts"]) + hist["below"] + hist["above"] + hist["nulls"] == funnel["rows_read"], column
    assert report["thresholds"]["aesthetic"] == [{"value": 5.0, "label": "aesthetic.min 5.0"}]
    checks = {"aesthetic": lambda v: v["aesthetic"] < 5.0, "watermark": lambda v: v["pwatermark"] > 0.5,
              "unsafe": lambda v: v["punsafe"] > 0.99,
              "min_side": lambda v: min(v["WIDTH"], v["HEIGHT"]) < 512,
              "max_side": lambda v: max(v["WIDTH"], v["HEIGHT"]) > 4096}
    removed = {reason: count for s in funnel["filters"] for reason, count in s["removed"].items()}
    assert set(report["samples"]) == {r for r, c in removed.items() if c}
    for reason, rows in report["samples"].items():
        assert 0 < len(rows) <= min(8, removed[reason])
        for row in rows:
            if reason.startswith("null_"):
                assert row["values"][reason[len("null_"):]] is None, (reason, row)
            elif reason in checks:
                assert checks[reason](row["values"]), (reason, row)
    page = open(os.path.join(folder, reports.REPORT_HTML)).read()
    assert page.count("data:image/png;base64,") >= 3 and "aesthetic" in page

    client = tracking_client(tmp_path)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, reports.REPORT_DIR)}
    assert {f"{reports.REPORT_DIR}/funnel.png", f"{reports.REPORT_DIR}/{reports.REPORT_HTML}"} <= artifacts
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in inputs}
    assert by_context["output"].name == f"filter/{os.path.basename(out_dir)}"
    assert json.loads(by_context["output"].profile)["num_rows"] == funnel["rows_written"]
    assert by_context["input"].source and "laion" in by_context["input"].source
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.note.content", "").startswith("`python -m pipelines.filter`")
    assert run.info.run_name.startswith(f"filter-{os.path.basename(out_dir)[:8]}-")


def tracking_client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_rerun_is_noop_changed_threshold_is_new_version_task_split_irrelevant(embedded_ray, laion_dir, tmp_path):
    out = str(tmp_path / "out")
    first = run_phase(laion_dir, out, tmp_path)
    part_files = sorted(os.listdir(first.output))
    mtimes = {f: os.stat(os.path.join(first.output, f)).st_mtime_ns for f in part_files}

    again = run_phase(laion_dir, out, tmp_path)
    assert again.skipped and again.output == first.output
    assert {f: os.stat(os.path.join(first.output, f)).st_mtime_ns for f in part_files} == mtimes

    # Parallelism knobs are not part of the version: same dir, so a new root to compare content.
    resplit = run_phase(laion_dir, str(tmp_path / "resplit"), tmp_path, "read.rows_per_task=1000",
                        "read.batch_rows=7")
    assert resplit.version == first.version
    assert read_output(resplit.output).equals(read_output(first.output))
    # A de-dup bucket above dedup.max_rows_per_task is done in slices (bounded memory): the same rows and funnel.
    sliced = run_phase(laion_dir, str(tmp_path / "sliced"), tmp_path, "dedup.max_rows_per_task=7")
    assert sliced.version != first.version
    assert set(read_output(sliced.output).column("uid").to_pylist()) == set(read_output(first.output).column("uid").to_pylist())
    assert {k: v for k, v in sliced.details["funnel"].items() if k not in ("seconds", "dedup")} == \
        {k: v for k, v in first.details["funnel"].items() if k not in ("seconds", "dedup")}
    assert any(f.count("-") == 2 and f.startswith("part-") for f in os.listdir(sliced.output))
    # The report too: histograms and samples merge exactly whatever the task split.
    report = [json.load(open(os.path.join(r.output, "report", "report.json"))) for r in (first, resplit)]
    assert report[0]["histograms"] == report[1]["histograms"] and report[0]["samples"] == report[1]["samples"]

    stricter = run_phase(laion_dir, out, tmp_path, "filters.aesthetic.min=6.0")
    assert stricter.version != first.version and not stricter.skipped
    assert sorted(os.listdir(out)) == sorted([first.version, stricter.version])
    assert manifest.has_manifest(first.output)  # the old version is untouched
    expected_removed, expected_uids = reference(all_input_rows(laion_dir), aesthetic_min=6.0)
    assert set(read_output(stricter.output).column("uid").to_pylist()) == expected_uids
    assert filter_phase.output_dir(config_lib.load(
        filter_phase.FilterConfig, None, [f"input={laion_dir}", f"output={out}", "dedup.num_buckets=3",
                                          "filters.aesthetic.min=6.0"])) == stricter.output


def test_missing_column_names_column_file_and_disabling_key(embedded_ray, tmp_path):
    os.makedirs(tmp_path / "in")
    write_v1(str(tmp_path / "in" / "a.parquet"), laion_rows(3, 60, []))
    table = pq.read_table(tmp_path / "in" / "a.parquet").drop_columns(["pwatermark"])
    pq.write_table(table, tmp_path / "in" / "no_watermark.parquet")
    with pytest.raises(filter_phase.FilterInputError) as err:
        run_phase(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path)
    message = str(err.value)
    assert "no_watermark.parquet" in message and "'pwatermark'" in message
    assert "filters.watermark.enabled=false" in message
    assert not os.path.exists(tmp_path / "out")  # nothing started, nothing left behind

    summary = run_phase(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path, "filters.watermark.enabled=false")
    assert summary.details["funnel"]["rows_read"] == 120
    assert "watermark" not in [s["filter"] for s in summary.details["funnel"]["filters"]]


def corrupt_second_row_group(path: str) -> None:
    """Overwrite the pages of row group 1 (footer intact): only reading the data finds it."""
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(open(path, "rb").read())
    data[chunk.data_page_offset:chunk.data_page_offset + chunk.total_compressed_size] = (
        b"\xff" * chunk.total_compressed_size)
    with open(path, "wb") as f:
        f.write(data)


def test_corrupt_files_stop_the_job_or_are_skipped_and_counted(embedded_ray, tmp_path):
    good = tmp_path / "in" / "good.parquet"
    os.makedirs(good.parent)
    write_v1(str(good), laion_rows(4, 100, []))
    with open(tmp_path / "in" / "garbage.parquet", "wb") as f:
        f.write(b"PAR1 this is not parquet")
    with pytest.raises(filter_phase.FilterInputError, match=r"garbage\.parquet.*skip_bad_files"):
        run_phase(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path)

    # Broken data pages behind a valid footer: found by the filter tasks, not the pre-flight.
    os.remove(tmp_path / "in" / "garbage.parquet")
    broken = tmp_path / "in" / "pages.parquet"
    write_v1(str(broken), laion_rows(5, 100, []))
    corrupt_second_row_group(str(broken))
    with pytest.raises(filter_phase.FilterInputError, match=r"pages\.parquet: cannot read parquet data"):
        run_phase(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path, "read.rows_per_task=50")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # failed version removed

    with open(tmp_path / "in" / "garbage.parquet", "wb") as f:
        f.write(b"not parquet at all")
    summary = run_phase(str(tmp_path / "in"), str(tmp_path / "out"), tmp_path, "skip_bad_files=true",
                        "read.rows_per_task=50")
    funnel = summary.details["funnel"]
    skipped = {os.path.basename(s["file"]): s for s in funnel["files"]["skipped"]}
    assert set(skipped) == {"garbage.parquet", "pages.parquet"}
    assert skipped["pages.parquet"]["rows"] == 100  # its first row group was read, then discarded
    assert funnel["rows_in_skipped_files"] == 100
    assert funnel["rows_read"] == 100 and funnel["files"]["read"] == 1
    assert funnel_adds_up(funnel)
    _, expected_uids = reference(read_back(str(good)))
    assert set(read_output(summary.output).column("uid").to_pylist()) == expected_uids


def test_interrupted_run_resumes_from_its_markers(embedded_ray, laion_dir, tmp_path):
    """A run killed after some filter tasks finished redoes only the others, with the same result."""
    args = [f"input={laion_dir}", f"output={tmp_path / 'out'}", f"data_root={tmp_path}", "dedup.num_buckets=3",
            "read.rows_per_task=100", "mlflow.enabled=false"]
    cfg = config_lib.load(filter_phase.FilterConfig, None, args)
    plan = filter_tasks.preflight(cfg)
    out_dir = filter_phase.output_dir(cfg)
    tmp_uri = filter_phase._prepare_tmp(out_dir, plan)  # what the killed run had set up...
    ctx = filter_tasks.stage_context(cfg, plan, tmp_uri)
    for unit in plan.units[:2]:  # ...and the two filter tasks it finished
        assert filter_tasks.filter_unit(filter_tasks.unit_row(unit, plan), ctx)["status"] == "ok"

    resumed = filter_phase.run(cfg)
    assert resumed.details["resumed"] == {"filter_tasks": 2, "buckets": 0}
    fresh = run_phase(laion_dir, str(tmp_path / "fresh"), tmp_path)
    assert resumed.details["funnel"]["filters"] == fresh.details["funnel"]["filters"]
    assert read_output(resumed.output).equals(read_output(fresh.output))


def test_dedup_off_keeps_every_survivor_and_extra_columns_are_carried(embedded_ray, laion_dir, tmp_path):
    summary = run_phase(laion_dir, str(tmp_path / "out"), tmp_path, "dedup.enabled=false",
                        "schema.extra_columns=[__index_level_0__]")
    funnel = summary.details["funnel"]
    assert funnel["duplicates_removed"] == 0 and funnel_adds_up(funnel)
    assert funnel["rows_written"] == funnel["rows_after_filters"]
    table = read_output(summary.output)
    assert table.num_rows == funnel["rows_written"]
    assert table.schema.names[-1] == "__index_level_0__"  # only the V2 file has it: nulls elsewhere
    index = table.column("__index_level_0__")
    assert 0 < index.null_count < table.num_rows
    assert not os.path.exists(os.path.join(summary.output, "duplicates"))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"filters\.order\[0\]: unknown filter 'colour'"):
        filter_phase.main(["--input", str(tmp_path), "--set", "filters.order=[colour]"])
    with pytest.raises(ConfigError, match=r"filters\.aesthetic\.min"):
        filter_phase.main(["--input", str(tmp_path), "--set", "filters.aesthetic.min=11"])
    with pytest.raises(ConfigError, match="input: required"):
        filter_phase.main(["--set", f"data_root={tmp_path}"])


def test_task_memory_requests_follow_the_config_not_the_input():
    """Each filter / de-dup task reserves memory from its buffer sizes (so Ray runs no more of them on a node
    than its memory holds), and a request no node can satisfy fails at start-up naming the keys to lower."""
    cfg = config_lib.from_dict(filter_phase.FilterConfig, {"input": "x"})
    default = filter_phase.task_memory(cfg)
    halved = filter_phase.task_memory(config_lib.from_dict(filter_phase.FilterConfig, {
        "input": "x", "read": {"batch_rows": cfg.read.batch_rows // 2, "buffer_rows": cfg.read.buffer_rows // 2},
        "dedup": {"max_rows_per_task": cfg.dedup.max_rows_per_task // 2}}))
    assert halved["filter"] < default["filter"] and halved["dedup"] < default["dedup"]
    # A small input asks for what its largest task can hold, not for the config's bound.
    small = filter_phase.task_memory(cfg, unit_rows=1000, bucket_rows=100)
    assert small["filter"] < filter_phase.TASK_BASE_BYTES + 2**21 and small["dedup"] < filter_phase.TASK_BASE_BYTES + 2**20
    assert filter_phase.task_memory(cfg, unit_rows=10**12, bucket_rows=10**12) == default
    assert filter_phase.task_memory(config_lib.from_dict(
        filter_phase.FilterConfig, {"input": "x", "read": {"task_memory_mib": 512}})) == {"filter": 2**29, "dedup": 2**29}
    filter_phase.check_task_memory(default, [max(default.values()) + 1.0])
    with pytest.raises(ConfigError, match=r"read.task_memory_mib: a dedup task needs .* lower dedup.max_rows_per_task"):
        filter_phase.check_task_memory(default, [default["filter"] + 1.0, 0.0])
    with pytest.raises(ConfigError, match="read.task_memory_mib"):
        config_lib.from_dict(filter_phase.FilterConfig, {"input": "x", "read": {"task_memory_mib": -1}})
