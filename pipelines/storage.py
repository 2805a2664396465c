"""One way to address data: local paths, file://, s3://, gs:// (and anything pyarrow.fs knows).

Phases never special-case local paths: they pass URIs around and call these helpers, which
resolve a URI to a `pyarrow.fs.FileSystem` plus a path on it. Writes of small files (manifests,
reports, configs) are atomic on local disk (temp file + rename) so a killed phase never leaves a
half-written manifest that a rerun would trust.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs

_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")


def is_remote(uri: str) -> bool:
    return str(uri).startswith(_REMOTE_SCHEMES)


def split_options(uri: str) -> tuple[str, str]:
    """A remote URI -> (scheme://bucket/path, "?options" or ""): the filesystem's options
    (`s3://bucket/laion?endpoint_override=127.0.0.1:9000&scheme=http`) travel with every URI derived from it,
    after its path, never inside it."""
    base, sep, query = str(uri).partition("?")
    return base, (sep + query if sep else "")


def normalize(uri: str | os.PathLike) -> str:
    """Local paths become absolute plain paths; file:// URIs become plain paths; remote URIs stay (a trailing
    slash of the path dropped, options kept)."""
    uri = os.fspath(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
        return os.path.abspath(uri or "/")
    if is_remote(uri):
        base, options = split_options(uri)
        return base.rstrip("/") + options
    if "://" in uri:
        raise ValueError(f"unsupported storage URI scheme: {uri!r} (use a local path, file://, s3:// or gs://)")
    return os.path.abspath(os.path.expanduser(uri))


@functools.lru_cache(maxsize=64)
def _remote_filesystem(root: str) -> pafs.FileSystem:
    """One filesystem per scheme://bucket?options (S3 clients are costly to make, and resolve a bucket's region)."""
    return pafs.FileSystem.from_uri(root)[0]


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path on that filesystem). Credentials come from the environment or the profile
    (pyarrow's S3 / GCS defaults), never from the URI."""
    uri = normalize(uri)
    if is_remote(uri):
        base, options = split_options(uri)
        scheme, _, path = base.partition("://")
        bucket = path.split("/", 1)[0]
        return _remote_filesystem(f"{scheme}://{bucket}{options}"), path
    return pafs.LocalFileSystem(), uri


def join(uri: str, *parts: str) -> str:
    uri = normalize(uri)
    if is_remote(uri):
        base, options = split_options(uri)
        return posixpath.join(base, *parts) + options
    return os.path.join(uri, *parts)


def parent(uri: str) -> str:
    """The directory holding `uri` (an object store's options kept)."""
    uri = normalize(uri)
    if is_remote(uri):
        base, options = split_options(uri)
        return posixpath.dirname(base.rstrip("/")) + options
    return os.path.dirname(uri.rstrip("/"))


def basename(uri: str) -> str:
    return posixpath.basename(split_options(normalize(uri))[0].rstrip("/"))


def local_path(uri: str) -> str | None:
    """The local filesystem path of a URI, or None when it lives in an object store."""
    uri = normalize(uri)
    return None if is_remote(uri) else uri


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str | tuple[str, ...] | None = None, recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under a directory (not directories)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    base = normalize(uri)
    options = split_options(base)[1] if is_remote(base) else ""
    out = []
    for entry in infos:
        if entry.type != pafs.FileType.File:
            continue
        name = entry.base_name
        if name.startswith((".", "_")):  # hidden, _SUCCESS, temp files
            continue
        if suffix is not None and not name.endswith(suffix):
            continue
        if is_remote(base):
            scheme = base.split("://", 1)[0]
            out.append(f"{scheme}://{entry.path}{options}")
        else:
            out.append(entry.path)
    return sorted(out)


def list_dirs(uri: str) -> list[str]:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    base = normalize(uri)
    dirs = [e for e in fs.get_file_info(pafs.FileSelector(path)) if e.type == pafs.FileType.Directory]
    return sorted(join(base, e.base_name) for e in dirs)


def file_info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file: {uri}")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc})") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; atomic on local disk (object stores publish on close anyway)."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def open_input(uri: str):
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def open_output(uri: str):
    fs, path = resolve(uri)
    return fs.open_output_stream(path)


def local_copy(uri: str) -> str:
    """A local path for a file or directory (a checkpoint, a weights file): local URIs are returned as they
    are; object-store ones are copied once into a per-URI cache under the temp dir (reused while complete)."""
    local = local_path(uri)
    if local is not None:
        return local
    import hashlib
    import tempfile

    path_part = split_options(normalize(uri))[0]
    name = hashlib.sha256(normalize(uri).encode()).hexdigest()[:16] + posixpath.splitext(path_part)[1]
    target = os.path.join(tempfile.gettempdir(), "wurst-local-copies", name)
    done = target + ".complete"
    if not os.path.exists(done):
        if is_dir(uri):
            base = path_part.split("://", 1)[-1]
            for path in list_files(uri, recursive=True):
                dest = os.path.join(target, posixpath.relpath(split_options(path)[0].split("://", 1)[-1], base))
                write_bytes(dest, read_bytes(path))
        else:
            write_bytes(target, read_bytes(uri))
        open(done, "w").close()
    return target
