"""`python -m pipelines.demo` (= `make demo`): the whole pipeline on the built-in dataset.

1. draws the demo dataset (shapes + captions + LAION-format metadata; `pipelines.demo_data`);
2. runs the workflow `configs/demo/workflow.yaml` on an embedded local Ray with MLflow in
   `<data_root>/mlflow.db`: filter -> download (from a loopback server the workflow starts) ->
   encoders -> train Stage A -> precompute -> train Stage B (fine-tuning the Semantic Compressor) ->
   precompute_c (Stage C's latents from that compressor) -> train Stage C -> generate -> evaluate;
3. prints where the generated grid, the funnel, the download report and the MLflow store are, the
   attribute probe's table (does the model follow its prompts?) and how to open the MLflow UI.

A second run skips every up-to-date phase; `--set` overrides reach the workflow config (e.g.
`--set steps.0.set='["filters.aesthetic.min=6.0"]'` is easier done by editing a copy of the YAML).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from pipelines import config as config_lib
from pipelines import demo_data, storage, workflow
from pipelines.phase import module_cli

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKFLOW = os.path.join(REPO_ROOT, "configs", "demo", "workflow.yaml")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_WORKFLOW, help="workflow config (default: %(default)s)")
    parser.add_argument("--data-root", default=os.environ.get("WURST_DATA_ROOT") or os.path.join(REPO_ROOT, "data"))
    parser.add_argument("--images", type=int, default=None, help="demo images to draw (default: the config's)")
    parser.add_argument("--submit", action="store_true", help="submit each phase to $RAY_ADDRESS with ray job submit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)

    start = time.time()
    data_root = os.path.abspath(args.data_root)
    os.environ["WURST_DATA_ROOT"] = data_root
    demo_root = os.path.join(data_root, "demo")
    n = args.images or int(os.environ.get("WURST_DEMO_IMAGES", "2000"))
    info = demo_data.generate(demo_root, n=n)
    log.info("dataset: %d metadata rows, %d images, served from %s", info["rows"], n, info["base_url"])

    overrides = [f"data_root={json.dumps(data_root)}", f"serve_demo={json.dumps(demo_root)}", *args.overrides]
    cfg = config_lib.load(workflow.WorkflowConfig, args.config, overrides)
    # The metadata location is the demo's, wherever the data root is.
    for step in cfg.steps:
        if step.input == "@demo":
            step.input = info["metadata"]
    summary = workflow.run(cfg, submit=args.submit)

    outputs = {name: s["output"] for name, s in summary.items()}
    report = {"seconds": round(time.time() - start, 1), "steps": summary}
    print("\n[demo] finished in %.0f s" % report["seconds"])
    lines = []
    if "generate" in outputs:
        lines.append(("generated grid", storage.join(outputs["generate"], "grid.png")))
    from pipelines import reports

    if "filter" in outputs:
        lines.append(("filter funnel", storage.join(outputs["filter"], "funnel.json")))
    for phase in ("filter", "download", "precompute"):  # the pictures: report/report.html (also in MLflow)
        page = storage.join(outputs[phase], reports.REPORT_DIR, reports.REPORT_HTML) if phase in outputs else None
        if page and storage.exists(page):
            lines.append((f"{phase} report", page))
    if "download" in outputs:
        lines.append(("download counts", storage.join(outputs["download"], "report.json")))
    lines.append(("MLflow store", f"sqlite:///{data_root}/mlflow.db"))
    for label, where in lines:
        print(f"  {label:16s} {where}")
    if "evaluate" in outputs:
        from pipelines.evaluation import probe

        evaluation = storage.read_json(storage.join(outputs["evaluate"], "evaluation.json"))
        lines_out = storage.join(outputs["evaluate"], "evaluation.json")
        if "probe" in evaluation:
            print("\nDoes the model follow its prompts? (unseen combinations, read back from the pixels)")
            print(probe.format_table(evaluation["probe"]))
        print(f"  evaluation       {lines_out}")
    print("Open the MLflow UI with:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{data_root}/mlflow.db --host 127.0.0.1 --port 5000")
    print("  then browse http://127.0.0.1:5000 (experiments wurst-filter, wurst-download, wurst-train, ...)")
    return report


if __name__ == "__main__":
    module_cli(__spec__.name)
