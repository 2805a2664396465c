"""Typed YAML configs: dataclasses validated at start-up.

A phase declares its config as (nested) dataclasses. `load(cls, path, overrides)` merges the
dataclass defaults (the paper's recipe), an optional YAML file and `--set a.b=value` overrides,
then validates: unknown keys, wrong types and out-of-range values raise `ConfigError` whose
message names the full key path (e.g. `filters.min_side: expected int >= 1, got -3`).

Constraints live next to the field: `field(default=5.0, metadata=rule(ge=0, le=10))`, or the
shorthand `param(5.0, ge=0, le=10)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import types
import typing
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

# 1e-4, -2E+3, 5e0: exponent notation without a dot, which YAML 1.1 (PyYAML) leaves a string.
_EXPONENT_FLOAT = re.compile(r"[-+]?\d+[eE][-+]?\d+")

T = TypeVar("T")

SECRET_KEY_PATTERN = re.compile(r"password|passwd|token|secret|credential|access_key|api_key|private_key", re.I)
REDACTED = "***REDACTED***"

# Credentials inside values: the userinfo of a URI (`postgresql://mlflow:PASSWORD@host/db`,
# `s3://KEY:SECRET@bucket/x`, `https://TOKEN@host/`) and query parameters that carry signatures or tokens
# (presigned S3 / GCS URLs, Azure SAS, API keys).
_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^@/\s?#'\"]+)@")
# Database roles are names, not secrets: their user stays readable, the password goes.
_KEEP_USER_SCHEMES = ("postgres", "postgresql", "mysql", "mariadb", "mssql", "oracle", "redis", "rediss", "mongodb")
_SECRET_QUERY_KEYS = (r"x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
                      r"|awsaccesskeyid|signature|sig|key|apikey|auth|access_token|id_token|code|sas"
                      r"|[a-z0-9_.-]*(?:" + SECRET_KEY_PATTERN.pattern + r")[a-z0-9_.-]*")
_SECRET_QUERY = re.compile(r"(?P<lead>[?&;])(?P<key>" + _SECRET_QUERY_KEYS + r")=(?P<value>[^&#\s'\"]*)", re.I)


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid; the message names the key path."""


def rule(*, ge=None, gt=None, le=None, lt=None, choices=None, help: str | None = None) -> dict:
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **constraints) -> Any:
    """A dataclass field with validation rules (ge/gt/le/lt/choices/help)."""
    kwargs: dict[str, Any] = {"metadata": rule(**constraints)}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


# --------------------------------------------------------------------------------------------
# Conversion of plain YAML values into typed dataclass instances


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        # YAML 1.1 (PyYAML, and so --set) reads a bare on / off as true / false: the words, where they are choices.
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        value = float(value)
        if value != value:  # NaN never makes sense as a setting
            raise ConfigError(f"{path}: expected a number, got NaN")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {_type_name(tp)}")


def _check_rules(value: Any, meta: Mapping, path: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in choices:
                raise ConfigError(f"{path}: expected one of {list(choices)}, got {v!r}")
    for key, op, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                          ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = meta.get(key)
        if bound is not None and isinstance(value, (int, float)) and not op(value, bound):
            raise ConfigError(f"{path}: expected a value {word} {bound}, got {value!r}")


def _build(cls: type[T], data: Mapping, prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown config key (valid keys{' in ' + prefix if prefix else ''}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _coerce(data[name], hints[name], path)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            raise ConfigError(f"{path}: required config key is missing")
        _check_rules(value, f.metadata, path)
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if prefix and not str(exc).startswith(prefix):
                raise ConfigError(f"{prefix}.{exc}") from None
            raise
    return obj


# --------------------------------------------------------------------------------------------
# Public API


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: depth + 1])}: is a value, not a section")
        node = child
    node[keys[-1]] = value


def from_dict(cls: type[T], data: Mapping | None) -> T:
    return _build(cls, dict(data or {}), "")


def load(cls: type[T], path: str | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults <- YAML file <- overrides, validated into `cls`."""
    data: dict = {}
    if path:
        from pipelines import storage

        try:
            text = storage.read_text(path)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        keys, value = parse_override(item)
        _apply(data, keys, value)
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable dict of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _redact_userinfo(match: re.Match) -> str:
    scheme, userinfo = match["scheme"], match["userinfo"]
    user, has_password, _ = userinfo.partition(":")
    if has_password and scheme[:-3].lower().split("+")[0] in _KEEP_USER_SCHEMES:
        return f"{scheme}{user}:{REDACTED}@"
    return f"{scheme}{REDACTED}@"


def redact_text(text: str) -> str:
    """`text` with the credentials inside any URI it contains replaced: the userinfo's password (and, but for
    database roles, the user, often an access key or a token), and secret-carrying query values."""
    if "://" not in text and "=" not in text:
        return text
    text = _URI_USERINFO.sub(_redact_userinfo, text)
    return _SECRET_QUERY.sub(lambda m: f"{m['lead']}{m['key']}={REDACTED}" if m["value"] else m[0], text)


def redact(tree: Any) -> Any:
    """Copy of a nested dict with values of secret-looking keys replaced, and credentials inside every
    string value (URIs with a password or a token) redacted too."""
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            if SECRET_KEY_PATTERN.search(str(key)) and value not in (None, "", [], {}):
                out[key] = REDACTED
            else:
                out[key] = redact(value)
        return out
    if isinstance(tree, (list, tuple)):
        return [redact(v) for v in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path))
        elif isinstance(value, (list, tuple, dict)):
            out[path] = json.dumps(value)
        else:
            out[path] = value
    return out


def config_hash(cfg: Any, exclude: Iterable[str] = ()) -> str:
    """Stable short hash of the config's content (keys in `exclude` are dotted top-level names
    of settings that do not change the output, e.g. parallelism)."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    for key in exclude:
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {})
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    blob = json.dumps(tree, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def argument_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """`--config FILE` and repeatable `--set KEY.PATH=VALUE`: the flags every command takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (local path or URI); default: the paper's settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value; repeatable")
    return parser


def load_from_args(cls: type[T], args: argparse.Namespace) -> T:
    overrides = list(args.overrides)
    for key in ("input", "output"):
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    return load(cls, args.config, overrides)
