"""Credentials inside URI values (a database password in a tracking URI, S3 keys in the userinfo, presigned
query signatures) never reach MLflow params or tags, manifest.json, config.yaml, the logs or an error line.

The phase below runs the shared lifecycle with a real SQLite MLflow store; its URIs are only ever written
down, never connected to.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from pipelines import config as config_lib
from pipelines import phase, tracking

import helpers

SECRETS = ("PASSWORD123", "AKIAEXAMPLEKEY", "SECRETKEYVALUE", "SIGNATURE999", "TOKEN777", "SASSIG555")
DB_URI = "postgresql://mlflow:PASSWORD123@db.internal:5432/mlflow"
S3_URI = "s3://AKIAEXAMPLEKEY:SECRETKEYVALUE@bucket/laion"
PRESIGNED = ("https://bucket.s3.amazonaws.com/a.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLEKEY%2F20261203&X-Amz-Signature=SIGNATURE999&X-Amz-Expires=60")


@dataclasses.dataclass
class SourcesConfig:
    input: str | None = None
    output: str | None = None
    data_root: str = ""
    database: str = DB_URI
    mirrors: list[str] = dataclasses.field(default_factory=lambda: [S3_URI, PRESIGNED,
                                                                    "https://x.blob.core.windows.net/c?sv=1&sig=SASSIG555"])
    hooks: dict = dataclasses.field(default_factory=lambda: {"notify": "https://hooks.example/?token=TOKEN777"})
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=lambda: tracking.MlflowConfig(system_metrics=False))


class SourcesPhase(phase.Phase):
    name = "redacttest"
    config_class = SourcesConfig
    output_subdir = "redacttest"
    uses_ray = False

    def input_identity(self, cfg) -> str:
        return "none"

    def mlflow_tags(self, ctx):
        return {**super().mlflow_tags(ctx), "wurst.source_uri": ctx.cfg.mirrors[0]}

    def execute(self, ctx):
        logging.getLogger("pipelines.redacttest").info("reading %s and %s (db %s)", ctx.cfg.mirrors[0],
                                                       ctx.cfg.mirrors[1], ctx.cfg.database)
        return phase.Outcome(counts={"rows": 0})


def test_redact_text_keeps_what_is_not_a_secret():
    r = config_lib.redact_text
    assert r(DB_URI) == f"postgresql://mlflow:{config_lib.REDACTED}@db.internal:5432/mlflow"
    assert r(S3_URI) == f"s3://{config_lib.REDACTED}@bucket/laion"
    assert r("https://TOKEN777@github.com/org/repo.git") == f"https://{config_lib.REDACTED}@github.com/org/repo.git"
    presigned = r(PRESIGNED)
    assert "SIGNATURE999" not in presigned and "AKIAEXAMPLEKEY" not in presigned
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in presigned and "X-Amz-Expires=60" in presigned
    for plain in ("sqlite:////data/mlflow.db", "s3://bucket/laion/part-0.parquet", "http://127.0.0.1:5000",
                  "/data/images/0123abcd", "filters.aesthetic.min=5.5", "https://x/?page=2&monkey=1"):
        assert r(plain) == plain
    # Nested configs: values inside lists and dicts, besides the secret-named keys.
    tree = config_lib.redact({"a": [S3_URI], "b": {"c": DB_URI}, "api_token": "x", "n": 3})
    assert not any(s in json.dumps(tree) for s in SECRETS) and tree["n"] == 3


def test_credentials_in_uris_reach_no_param_tag_manifest_config_or_log(tmp_path, caplog):
    root = tmp_path / "data"
    root.mkdir()
    cfg = config_lib.from_dict(SourcesConfig, {"data_root": str(root)})
    phase.setup_logging()  # what every command does: installs the redacting filter on the handlers
    with caplog.at_level(logging.INFO):
        result = SourcesPhase().run(cfg)
    out = result.output
    for name in ("manifest.json", "config.yaml"):
        text = open(os.path.join(out, name)).read()
        assert not [s for s in SECRETS if s in text], name
        assert "db.internal:5432/mlflow" in text  # the rest of the URI stays, for the reader
    client = helpers.mlflow_client(str(root))
    run = client.get_run(result.manifest["mlflow_run_id"])
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert not [s for s in SECRETS if s in logged]
    assert run.data.tags["wurst.source_uri"] == config_lib.redact_text(S3_URI)
    # The log line as a handler formats it: the root handlers carry the redacting filter.
    record = next(r for r in caplog.records if r.name == "pipelines.redacttest")
    handler = logging.getLogger().handlers[0]
    assert any(isinstance(f, phase.RedactingFilter) for f in handler.filters)
    for f in handler.filters:
        f.filter(record)
    formatted = handler.format(record)
    assert "reading s3://" in formatted and not [s for s in SECRETS if s in formatted]


def test_an_error_line_is_redacted(capsys):
    def fails(argv):
        raise phase.InputError(f"input {S3_URI}: not a directory")

    with pytest.raises(SystemExit):
        phase.run_cli("redacttest", fails, argv=[])
    err = capsys.readouterr().err
    assert "redacttest: error: input s3://" in err and "SECRETKEYVALUE" not in err
