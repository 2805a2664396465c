"""One lock per phase and version, so two runs of the same output never work (and clean up) at once.

`acquire(lock_uri, phase, version)` creates the lock file exclusively, with the holder's host, pid, process
start time and start time in it, or raises `PhaseLockedError` naming the holder. A lock whose holder is
provably gone is taken over (with a warning): same host, and that pid is not running, or is running but
is a later process that reused the number (its start time differs). A holder on another host cannot be
asked, so it proves it is alive by a heartbeat: it rewrites `heartbeat_at` in its record every
`HEARTBEAT_S`; a lock from another host whose heartbeat is older than `STALE_AFTER_S` is stale (a crashed
job's pod on Kubernetes, a lost node). The error says which file to delete when in doubt.

Creating exclusively:
* local disk: the record is written to a temp file, then hard-linked to the lock's name (`link` fails
  when the name exists, and a reader never sees a half-written record); `O_EXCL` where links are not
  supported;
* object stores: fsspec's exclusive create (`open(path, "xb")`: a conditional PUT, `If-None-Match: *` on
  S3 in s3fs >= 2025.7, `ifGenerationMatch=0` in gcsfs) when the scheme's fsspec filesystem is installed;
  otherwise check, write, read back and compare, which leaves a short race window and says so in a warning.

Taking over is itself exclusive: the taker first creates `<lock>.break-<digest of the stale record>`, so of
two runs that find the same stale lock only one deletes it, and neither can delete a fresh lock that the
other created meanwhile (the record is re-read and compared before the delete).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from pipelines import storage

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0  # how often a holder rewrites its heartbeat
STALE_AFTER_S = 600.0  # a lock from another host without a heartbeat for this long is stale (clock skew allowed)


class PhaseLockedError(RuntimeError):
    """Another run of the same phase and version holds its lock (the message names the holder). The
    command line reports it as an input error (exit status 1, one line)."""


def _process_started(pid: int) -> Optional[float]:
    """The start time of process `pid` (seconds since the epoch), None when it is not running, -1 when it
    runs but its start time cannot be read."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil, NoSuchProcess, ZombieProcess, AccessDenied: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return -1.0


def holder_record(phase: str, version: str) -> dict:
    pid = os.getpid()
    return {"phase": phase, "version": version, "host": socket.gethostname(), "pid": pid,
            "pid_started": _process_started(pid),
            "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat_at": time.time(), "token": uuid.uuid4().hex}


def stale_reason(holder: dict, stale_after: float = STALE_AFTER_S) -> Optional[str]:
    """Why a lock's holder is certainly gone, or None when it may still be running."""
    if holder.get("host") != socket.gethostname():
        beat = holder.get("heartbeat_at")
        if isinstance(beat, (int, float)) and time.time() - beat > stale_after:
            return f"no heartbeat from {holder.get('host')} for {time.time() - beat:.0f} s (> {stale_after:.0f} s)"
        return None
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    started = _process_started(pid)
    if started is None:
        return f"pid {pid} is not running on {holder['host']}"
    recorded = holder.get("pid_started")
    if isinstance(recorded, (int, float)) and recorded > 0 and started > 0 and abs(started - recorded) > 1.0:
        return f"pid {pid} on {holder['host']} is a later process (started at another time)"
    return None


def describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started_at', '?')}")


# --------------------------------------------------------------------------------------------
# Where the lock lives: create exclusively, read, delete


class _LocalBackend:
    def __init__(self, path: str):
        self.path = path
        self._made: list[str] = []  # directories create() made, deepest first: removed again when empty

    def create(self, data: bytes) -> bool:
        parent = os.path.dirname(self.path) or "."
        missing = parent
        while missing and not os.path.isdir(missing):
            self._made.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            os.unlink(tmp)

    def read(self) -> Optional[bytes]:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def overwrite(self, data: bytes) -> None:
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)  # readers see the old record or the new one, never half of one

    def delete(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        for directory in self._made:  # a run that failed at once leaves no empty output root behind
            try:
                os.rmdir(directory)
            except OSError:
                break
        self._made = []

    def sibling(self, suffix: str) -> "_LocalBackend":
        return _LocalBackend(self.path + suffix)


class _FsspecBackend:
    """An object store through fsspec, whose `open(path, "xb")` is a conditional create."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> bool:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False

    def read(self) -> Optional[bytes]:
        try:
            with self.fs.open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def overwrite(self, data: bytes) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write(data)

    def delete(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def sibling(self, suffix: str) -> "_FsspecBackend":
        return _FsspecBackend(self.fs, self.path + suffix)


class _CheckThenWriteBackend:
    """An object store without a conditional write here: check, write, read back (a short race window)."""

    def __init__(self, uri: str):
        self.uri = uri

    def create(self, data: bytes) -> bool:
        if storage.exists(self.uri):
            return False
        storage.write_bytes(self.uri, data)
        return storage.read_bytes(self.uri) == data

    def read(self) -> Optional[bytes]:
        try:
            return storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None

    def overwrite(self, data: bytes) -> None:
        storage.write_bytes(self.uri, data)

    def delete(self) -> None:
        storage.delete(self.uri)

    def sibling(self, suffix: str) -> "_CheckThenWriteBackend":
        return _CheckThenWriteBackend(self.uri + suffix)


def backend_for(uri: str):
    local = storage.local_path(uri)
    if local is not None:
        return _LocalBackend(local)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(storage.normalize(uri))
        return _FsspecBackend(fs, path)
    except (ImportError, ValueError) as exc:
        log.warning("lock %s: no fsspec filesystem with conditional writes for this scheme (%s); falling back "
                    "to check-then-write, which two runs starting in the same instant can both pass. Install "
                    "s3fs >= 2025.7 (s3://) or gcsfs (gs://) for an exclusive lock", uri, exc)
        return _CheckThenWriteBackend(storage.normalize(uri))


# --------------------------------------------------------------------------------------------
# The lock


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _token(data: Optional[bytes]) -> Optional[str]:
    try:
        return json.loads(data).get("token") if data else None
    except (ValueError, AttributeError):
        return None


@dataclasses.dataclass
class PhaseLock:
    uri: str
    record: dict
    backend: object
    heartbeat_s: float = HEARTBEAT_S
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _thread: Optional[threading.Thread] = dataclasses.field(default=None, repr=False)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.uri}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if _token(self.backend.read()) != self.record["token"]:
                    log.warning("lock %s is no longer this run's; heartbeat stopped", self.uri)
                    return
                self.record["heartbeat_at"] = time.time()
                self.backend.overwrite(_encode(self.record))
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                log.warning("lock %s: heartbeat failed (%s)", self.uri, exc)

    def release(self) -> None:
        """Delete the lock, if it is still ours (a run that took over a lock it thought stale keeps its own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.backend.read()
        if current is None:
            log.warning("lock %s vanished while this run held it", self.uri)
            return
        if _token(current) != self.record["token"]:
            log.warning("lock %s now belongs to another run (%s); leaving it", self.uri, current[:200])
            return
        self.backend.delete()

    def __enter__(self) -> "PhaseLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _parse(data: bytes) -> Optional[dict]:
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _take_over(backend, stale: bytes) -> bool:
    """Delete the stale lock whose content is `stale`, unless another run is already doing so (False)."""
    breaker = backend.sibling(".break-" + hashlib.sha256(stale).hexdigest()[:16])
    if not breaker.create(b""):
        return False
    try:
        if backend.read() == stale:  # still the stale record: nobody replaced it while we looked
            backend.delete()
    finally:
        breaker.delete()
    return True


def acquire(lock_uri: str, phase: str, version: str, backend=None, heartbeat_s: float = HEARTBEAT_S,
            stale_after: float = STALE_AFTER_S) -> PhaseLock:
    """Take the lock of (phase, version) at `lock_uri`, or raise PhaseLockedError naming its holder; the
    lock's heartbeat runs until `release()`."""
    backend = backend or backend_for(lock_uri)
    record = holder_record(phase, version)
    data = _encode(record)
    for _ in range(5):
        if backend.create(data):
            lock = PhaseLock(lock_uri, record, backend, heartbeat_s)
            lock.start_heartbeat()
            return lock
        current = backend.read()
        if current is None:  # released between our create and our read: try again
            continue
        holder = _parse(current)
        if holder is None:
            raise PhaseLockedError(f"{phase} {version}: lock {lock_uri} exists but is not a lock record "
                                   f"({current[:80]!r}); delete it if no other run of this phase is working")
        why = stale_reason(holder, stale_after)
        if why is None:
            raise PhaseLockedError(
                f"{phase} {version}: another run is working on this output and holds {lock_uri} "
                f"({describe(holder)}); wait for it to finish, or delete the lock if that process is gone")
        log.warning("%s %s: taking over the stale lock %s (%s; %s)", phase, version, lock_uri, describe(holder), why)
        if not _take_over(backend, current):
            raise PhaseLockedError(
                f"{phase} {version}: another run is taking over the stale lock {lock_uri} ({describe(holder)}); "
                f"if none is, delete {lock_uri}.break-* and the lock")
    raise PhaseLockedError(f"{phase} {version}: could not take {lock_uri}: other runs keep taking and releasing it")
