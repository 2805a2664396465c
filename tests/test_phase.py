"""The one phase lifecycle (pipelines.phase) on a toy phase: versions, skip, lineage, manifest, exit codes."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Optional

import pytest

from pipelines import config as config_lib
from pipelines import manifest, storage, tracking
from pipelines.config import param
from pipelines.phase import Context, InputError, Outcome, Phase, run_cli


@dataclasses.dataclass
class ToyConfig:
    input: Optional[str] = None
    output: Optional[str] = None
    data_root: str = "."
    factor: int = param(2, ge=1)
    workers: int = param(1, ge=1)  # parallelism: not part of the version
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)


class ToyPhase(Phase):
    """Multiplies the numbers of the input's numbers.txt by `factor`."""

    name = "toy"
    config_class = ToyConfig
    output_subdir = "toy"
    version_exclude = ("input", "output", "data_root", "mlflow", "workers")
    uses_ray = False

    def __init__(self):
        self.executed = 0

    def prepare(self, ctx: Context) -> None:
        path = storage.join(ctx.input_uri, "numbers.txt")
        if not storage.exists(path):
            raise InputError(f"{path}: no such file (the toy input needs numbers.txt)")
        ctx.state["numbers"] = [int(x) for x in storage.read_text(path).split()]

    def execute(self, ctx: Context) -> Outcome:
        self.executed += 1
        storage.makedirs(ctx.output)
        out = [n * ctx.cfg.factor for n in ctx.state["numbers"]]
        storage.write_text(storage.join(ctx.output, "numbers.txt"), " ".join(map(str, out)))
        if any(n < 0 for n in ctx.state["numbers"]):
            raise InputError("negative numbers are not allowed")
        ctx.log_metrics({"numbers": len(out)})
        return Outcome(counts={"numbers": len(out)}, extra={"sum": sum(out)}, details={"numbers": out})


def load(tmp_path, *overrides: str) -> ToyConfig:
    return config_lib.load(ToyConfig, None, [f"data_root={tmp_path}", f"input={tmp_path / 'in'}",
                                             f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                             "mlflow.system_metrics=false", *overrides])


@pytest.fixture
def toy_input(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "numbers.txt").write_text("1 2 3")
    return tmp_path


def test_run_writes_manifest_with_lineage_then_skips_and_versions_by_config(toy_input):
    tmp_path, phase = toy_input, ToyPhase()
    first = phase.run(load(tmp_path))
    assert not first.skipped and first.details == {"numbers": [2, 4, 6]}
    assert first.output == str(tmp_path / "toy" / first.version) == phase.output_dir(load(tmp_path))
    written = manifest.read(first.output)
    assert written["counts"] == {"numbers": 3} and written["sum"] == 12 and written["phase"] == "toy"
    assert written["input"]["uri"] == str(tmp_path / "in") and written["input"]["identity"].startswith("listing:")
    (run,) = tracking.find_runs("toy", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert written["mlflow_run_id"] == run.info.run_id and run.data.metrics["numbers"] == 3
    # Readable: phase, version, the input's name, the UTC date.
    assert re.fullmatch(rf"toy-{first.version[:8]}-in-\d{{8}}", run.info.run_name), run.info.run_name
    assert run.data.tags["wurst.output_uri"] == first.output

    again = phase.run(load(tmp_path, "workers=4"))  # parallelism does not change the version
    assert again.skipped and again.output == first.output and again.manifest == written and phase.executed == 1
    other = phase.run(load(tmp_path, "factor=3"))
    assert other.version != first.version and other.details == {"numbers": [3, 6, 9]}
    (tmp_path / "in" / "numbers.txt").write_text("1 2 3 4")  # a changed input is a new version too
    assert phase.output_dir(load(tmp_path)) != first.output


def test_input_error_discards_only_what_the_run_started(toy_input, monkeypatch):
    tmp_path, phase = toy_input, ToyPhase()
    removed = []
    monkeypatch.setattr(phase, "discard", lambda ctx: removed.append(ctx.output))
    (tmp_path / "in" / "numbers.txt").write_text("1 -2")
    with pytest.raises(InputError, match="negative"):
        phase.run(load(tmp_path))
    assert removed and not manifest.has_manifest(removed[0])


@pytest.mark.parametrize("argv, code, message", [
    (["--set", "factor=0"], 2, "toy: error: factor: expected a value >= 1, got 0"),
    (["--input", "/nonexistent-wurst-input"], 1, "toy: error: no such file or directory: /nonexistent-wurst-input"),
])
def test_command_line_exit_codes(toy_input, capsys, monkeypatch, argv, code, message):
    tmp_path, phase = toy_input, ToyPhase()
    monkeypatch.setattr(sys, "argv", ["toy", "--set", f"data_root={tmp_path}", "--set", "mlflow.enabled=false", *argv])
    with pytest.raises(SystemExit) as exit_:
        run_cli(phase.name, phase.main)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

