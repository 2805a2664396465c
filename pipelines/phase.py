"""One lifecycle for every phase, and one command line for all of them.

A phase reads one dataset and writes a new one, `<output root>/<version>/`. What every phase does
around its work lives here, once: resolve the input, derive the version from the config and the input's
identity, skip when the output is complete, start (or join) Ray, open the MLflow run with lineage tags,
run the work, write `manifest.json` last. A phase module declares its config dataclass and a `Phase`
subclass that holds only what is particular to it (`prepare`, `execute`, and where its defaults differ).

Exit codes of every command: 0 done (or up to date), 2 a bad config value (the message names the key
path), 1 an input the phase cannot use (`InputError`, or a missing file).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import time
from typing import Any, Callable, ClassVar, Optional

from pipelines import config as config_lib
from pipelines import locks
from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class InputError(ValueError):
    """The phase's input cannot be used as configured (missing, corrupt, failed shards): exit status 1.
    The message names the file, column or key."""


class RedactingFilter(logging.Filter):
    """Replaces credentials inside URIs in a log record's message (a tracking URI with a password, a
    presigned URL): `config.redact_text` on the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = config_lib.redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Every command logs through `logging.getLogger(__name__)`; this sets the handler up once (on
    stderr, so stdout carries only the command's JSON result), with credentials in URIs redacted."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    root.setLevel(min(root.level or level, level))
    for name in ("pipelines", "stages", "data_filters", "cluster"):
        logging.getLogger(name).setLevel(level)


def _input_errors() -> tuple[type[BaseException], ...]:
    """InputError, a missing file, and a malformed stages checkpoint (stages stays free of pipelines,
    so its CheckpointError is not an InputError; it can only have been raised if stages.checkpoint is loaded)."""
    errors: tuple[type[BaseException], ...] = (InputError, FileNotFoundError, locks.PhaseLockedError)
    checkpoint = sys.modules.get("stages.checkpoint")
    return errors + ((checkpoint.CheckpointError,) if checkpoint is not None else ())


def run_cli(name: str, main: Callable[[list[str]], Any], argv: Optional[list[str]] = None) -> None:
    """The `python -m pipelines.<name>` entry: ``main(sys.argv[1:])``; an expected failure ends with one line
    ``<name>: error: ...`` on stderr instead of a traceback (exit 2 for a config error, 1 for an input
    error). ``main`` itself raises, so Python callers (tests, the workflow) see the exception."""
    setup_logging()
    try:
        result = main(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"{name}: error: {config_lib.redact_text(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except _input_errors() as exc:
        print(f"{name}: error: {config_lib.redact_text(str(exc))}", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)


def module_cli(module_name: str) -> None:
    """`if __name__ == "__main__": module_cli(__spec__.name)` in a phase module: runs the *imported*
    module's entry, not __main__'s. Ray pickles functions of __main__ by value, so tasks and workers
    would get copies without the module's imports and set-up."""
    import importlib

    module = importlib.import_module(module_name)
    phase = getattr(module, "PHASE", None)
    if isinstance(phase, Phase):
        run_cli(phase.name, phase.main)
    else:
        run_cli(module_name.rsplit(".", 1)[-1], module.main)


@dataclasses.dataclass
class Outcome:
    """What a phase's work produced: the manifest's counts and extra keys, and the details callers get
    back (the funnel, the download report, a training summary)."""

    counts: dict
    extra: dict = dataclasses.field(default_factory=dict)
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PhaseResult:
    """The result of every phase run, whether it did the work or found it done."""

    phase: str
    output: str
    version: str
    skipped: bool
    manifest: dict
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts") or {}

    def summary(self) -> dict:
        """The JSON object the command prints."""
        return {"phase": self.phase, "output": self.output, "version": self.version, "skipped": self.skipped,
                "counts": self.counts}


@dataclasses.dataclass
class Context:
    """One run of a phase: its config, where it writes, its input, Ray and the MLflow run; `state`
    carries what `prepare` worked out to `execute`."""

    cfg: Any
    output: str
    version: str
    input_uri: Optional[str]
    input_id: Optional[str]
    started: float = dataclasses.field(default_factory=time.time)
    ray: Any = None
    mlflow_run: Any = None
    state: dict = dataclasses.field(default_factory=dict)

    @property
    def run_id(self) -> Optional[str]:
        return self.mlflow_run.info.run_id if self.mlflow_run is not None else None

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if self.mlflow_run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, obj: dict, name: str) -> None:
        if self.mlflow_run is not None:
            import mlflow

            mlflow.log_dict(obj, name)

    def set_tags(self, tags: dict) -> None:
        if self.mlflow_run is not None:
            import mlflow

            mlflow.set_tags(tags)

    def log_files(self, files: dict[str, str], artifact_path: str) -> None:
        """Files ({name: uri}, e.g. a report's) as the run's artifacts under `artifact_path`."""
        if self.mlflow_run is None:
            return
        import mlflow

        for name, uri in files.items():
            mlflow.log_artifact(storage.local_copy(uri), artifact_path)


class Phase:
    """A dataset-producing phase. Subclasses set the class attributes and implement `execute`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    output_subdir: ClassVar[str]
    description: ClassVar[str] = ""
    # Settings that cannot change the output: left out of the version hash.
    version_exclude: ClassVar[tuple[str, ...]] = ("input", "output", "data_root", "ray", "mlflow")
    uses_ray: ClassVar[bool] = True
    # The command line's --input / --output flags and what they say.
    input_help: ClassVar[Optional[str]] = "input dataset URI (overrides config key `input`)"
    output_help: ClassVar[Optional[str]] = "output root URI (overrides config key `output`)"

    # ------------------------------------------------------------------ where things go
    def input_uri(self, cfg) -> Optional[str]:
        """The input's URI (None for a phase without one); raise ConfigError when it is required and unusable."""
        value = getattr(cfg, "input", None)
        return storage.normalize(value) if value else None

    def input_identity(self, cfg) -> Optional[str]:
        uri = self.input_uri(cfg)
        return manifest_lib.input_identity(uri) if uri else None

    def version_config(self, cfg) -> Any:
        """What the version hashes besides the input (a phase may add, e.g. encoder checkpoint hashes)."""
        return cfg

    def version(self, cfg, input_id: Optional[str] = None) -> str:
        if input_id is None:
            input_id = self.input_identity(cfg)
        return manifest_lib.version_id(self.name, self.version_config(cfg), input_id or "",
                                       exclude=self.version_exclude)

    def output_root(self, cfg) -> str:
        return storage.normalize(cfg.output) if getattr(cfg, "output", None) else \
            storage.join(cfg.data_root, self.output_subdir)

    def lock_uri(self, cfg, version: str) -> str:
        """The lock of one output version: next to it (`<output root>/<version>.lock`), not inside it, so
        that deleting a partial output never deletes its lock."""
        return storage.join(self.output_root(cfg), f"{version}.lock")

    def output_dir(self, cfg, input_id: Optional[str] = None) -> str:
        """`<output root>/<version>`: where this config writes for its input (computed, nothing run)."""
        return storage.join(self.output_root(cfg), self.version(cfg, input_id))

    def is_complete(self, cfg, output: str) -> bool:
        return manifest_lib.has_manifest(output)

    # ------------------------------------------------------------------ MLflow
    def mlflow_config(self, cfg) -> tracking.MlflowConfig:
        return cfg.mlflow

    def lineage_input(self, ctx: Context) -> Optional[str]:
        return ctx.input_uri

    def mlflow_run_name(self, ctx: Context) -> str:
        """`mlflow.run_name`, else `<phase>-<version, 8>-<input>-<UTC date>`, e.g.
        `download-c85fa064-filter-d1148665-20261203` (the input: its phase and version, or its last path part)."""
        configured = self.mlflow_config(ctx.cfg).run_name
        if configured:
            return configured
        source = tracking.dataset_entry(ctx.input_uri)["name"].replace("/", "-") if ctx.input_uri else None
        if source and "-" in source and len(source.split("-")[-1]) > 8:  # <phase>-<full version hash>
            source = source[:source.rindex("-") + 9]
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
        return "-".join(p for p in (self.name, ctx.version[:8], source, date) if p)

    def output_dataset(self, ctx: Context, manifest: dict) -> Optional[dict]:
        """The output as MLflow lists it (`tracking.dataset_entry`); None for phases whose output is no dataset."""
        return tracking.dataset_entry(ctx.output, name=f"{self.name}/{ctx.version}",
                                      digest=manifest_lib.manifest_hash(ctx.output), rows=tracking.dataset_rows(manifest))

    def mlflow_tags(self, ctx: Context) -> dict:
        return {"wurst.output_uri": ctx.output, "wurst.version": ctx.version}

    def resume_run_id(self, ctx: Context) -> Optional[str]:
        """An MLflow run to continue instead of opening a new one (a resumed training run)."""
        return None

    # ------------------------------------------------------------------ the work
    def prepare(self, ctx: Context) -> None:
        """Checks and plans before the MLflow run opens (Ray is up when the phase uses it)."""

    def execute(self, ctx: Context) -> Outcome:
        raise NotImplementedError

    def discard(self, ctx: Context) -> None:
        """After an input error: drop what this run started (never a finished dataset)."""

    def record(self, ctx: Context, manifest: dict) -> None:
        """After the manifest is written, while the MLflow run is still open (e.g. log it as an artifact)."""

    def finish(self, ctx: Context, manifest: dict) -> None:
        """After the manifest is written and the MLflow run closed (temp files go here)."""

    def existing(self, cfg, output: str) -> PhaseResult:
        manifest = manifest_lib.read(output)
        return PhaseResult(self.name, output, storage.basename(output), True, manifest,
                           self.existing_details(output, manifest))

    def existing_details(self, output: str, manifest: dict) -> dict:
        return {}

    # ------------------------------------------------------------------ the lifecycle
    def run(self, cfg) -> PhaseResult:
        """Run the phase, or return the complete output of an earlier run with the same config and input."""
        input_uri = self.input_uri(cfg)
        input_id = self.input_identity(cfg)
        version = self.version(cfg, input_id)
        output = storage.join(self.output_root(cfg), version)
        if self.is_complete(cfg, output):
            log.info("%s: %s is complete (manifest.json present): nothing to do", self.name, output)
            return self.existing(cfg, output)
        # Before anything is prepared or cleaned: a second run of this output fails here, naming the first.
        with locks.acquire(self.lock_uri(cfg, version), self.name, version):
            if self.is_complete(cfg, output):  # finished by the run that held the lock a moment ago
                return self.existing(cfg, output)
            return self._run_locked(cfg, input_uri, input_id, version, output)

    def _run_locked(self, cfg, input_uri: Optional[str], input_id: Optional[str], version: str,
                    output: str) -> PhaseResult:
        ctx = Context(cfg=cfg, output=output, version=version, input_uri=input_uri, input_id=input_id)
        if self.uses_ray:
            from pipelines.runtime import init_ray

            ctx.ray = init_ray(cfg.ray)
        try:
            self.prepare(ctx)
            with tracking.start_run(self.name, cfg, data_root=cfg.data_root, mlflow_cfg=self.mlflow_config(cfg),
                                    input_uri=self.lineage_input(ctx), run_name=self.mlflow_run_name(ctx),
                                    run_id=self.resume_run_id(ctx), tags=self.mlflow_tags(ctx),
                                    description=self.description) as mlflow_run:
                ctx.mlflow_run = mlflow_run
                outcome = self.execute(ctx)
                manifest = manifest_lib.write(output, phase=self.name, cfg=cfg, input_uri=self.lineage_input(ctx),
                                              input_id=input_id, counts=outcome.counts, extra=outcome.extra,
                                              mlflow_run_id=ctx.run_id)
                self.record(ctx, manifest)
                if ctx.mlflow_run is not None:
                    produced = self.output_dataset(ctx, manifest)
                    tracking.log_datasets([tracking.dataset_entry(ctx.input_uri)] if self.lineage_input(ctx) else [],
                                          [produced] if produced else [])
        except InputError:
            self.discard(ctx)
            raise
        self.finish(ctx, manifest)
        log.info("%s: wrote %s in %.1f s", self.name, output, time.time() - ctx.started)
        return PhaseResult(self.name, output, version, False, manifest, outcome.details)

    # ------------------------------------------------------------------ the command line
    def argument_parser(self, prog: Optional[str] = None) -> argparse.ArgumentParser:
        parser = config_lib.argument_parser(self.description, prog=prog or f"python -m pipelines.{self.name}")
        if self.input_help:
            parser.add_argument("--input", help=self.input_help)
        if self.output_help:
            parser.add_argument("--output", help=self.output_help)
        return parser

    def load_config(self, argv: Optional[list[str]] = None, prog: Optional[str] = None):
        return config_lib.load_from_args(self.config_class, self.argument_parser(prog).parse_args(argv))

    def summary(self, result: PhaseResult) -> dict:
        """The JSON object the command prints: `PhaseResult.summary()`, plus what a phase adds."""
        return result.summary()

    def main(self, argv: Optional[list[str]] = None) -> PhaseResult:
        """Parse the command line, run, print the result as one JSON object."""
        result = self.run(self.load_config(argv))
        print(json.dumps(self.summary(result), indent=2, default=str), flush=True)
        return result
