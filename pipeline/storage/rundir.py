"""The run directory: the one contract every job's OUTPUT keeps, on local disks and object stores alike.

Every job (mine, extract, pretrain, finetune, fewshot) writes its bookkeeping under `OUTPUT/__splinter__/`:
    job.json     what wrote this directory: the job, its settings (and a fingerprint of its inputs)
    lease.json   held by the run writing it now: host, pid, renewed every few seconds
    stats.json   the job's summary, written when it finishes
    _SUCCESS     written last: the run is complete (a directory without it is partial, whatever it holds)
Next to it each job keeps only what is its own: Parquet shards (mine, extract), checkpoints and the final
model (pretrain, finetune), one folder per run (fewshot).

The rules, the same for all five jobs:
- The tool never deletes what it did not write. A directory holding files of someone else's is refused
  (shard jobs, whose OUTPUT must stay a clean Parquet dataset) or left untouched (training jobs).
- One run at a time: a live run holds the lease and renews it. A second run into the same OUTPUT, with or
  without --overwrite/--resume, is refused in one line naming who holds it. A lease whose holder died (its
  pid is gone on this host, or it was not renewed for `LEASE_TTL_S`) is taken over.
- A rerun continues the earlier run (with --resume for shard jobs; by rerunning the same command for
  training jobs) only when its settings are the same; --overwrite replaces the earlier run, ours only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from pipeline.settings import ConfigError
from pipeline.storage.filesystems import filesystem

__all__ = [
    "JOB_FILE", "LEASE_FILE", "META", "STATS_FILE", "SUCCESS_FILE", "LeaseHeldError", "OutputExistsError",
    "RunDir", "delete_path", "is_complete", "read_json", "read_stats", "write_json",
]  # fmt: skip

META = "__splinter__"
JOB_FILE = f"{META}/job.json"
LEASE_FILE = f"{META}/lease.json"
STATS_FILE = f"{META}/stats.json"
SUCCESS_FILE = f"{META}/_SUCCESS"
# A lease not renewed for this long belongs to a run that is gone (a lost node, a killed pod).
LEASE_TTL_S = float(os.environ.get("SPLINTER_LEASE_TTL", "60"))


class OutputExistsError(ConfigError):
    """OUTPUT may not be written by this run; the message says why and what to do (exit 2)."""


class LeaseHeldError(OutputExistsError):
    """Another live run is writing OUTPUT."""


# ------------------------------------------------------------------------------------------ JSON files
def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Write `obj` as JSON atomically: a uniquely named temporary file, then a rename (on object stores a
    single PUT, atomic too), so a reader sees the old file or the new one, never half of one."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    with fs.open_output_stream(tmp, compression=None) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
    fs.move(tmp, path)


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path, compression=None) as f:
        return json.loads(f.read())


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def delete_path(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file or a folder; nothing if it is not there."""
    kind = _kind(fs, path)
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def is_complete(output: str) -> bool:
    """Did a job finish writing `output`?"""
    fs, root = filesystem(output)
    return _kind(fs, f"{root}/{SUCCESS_FILE}") == pafs.FileType.File


def read_stats(output: str) -> dict[str, Any]:
    """The summary a finished job wrote (what it printed)."""
    fs, root = filesystem(output)
    return read_json(fs, f"{root}/{STATS_FILE}")


# ------------------------------------------------------------------------------------------ the lease
def _process_start(pid: int) -> str | None:
    """When `pid` started (Linux: field 22 of /proc/PID/stat), telling a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return started is None or _process_start(pid) in (None, started)


class Lease:
    """`OUTPUT/__splinter__/lease.json`, held by the run writing OUTPUT and renewed by a daemon thread."""

    def __init__(self, fs: pafs.FileSystem, root: str, output: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.fs, self.path, self.output, self.ttl_s = fs, f"{root}/{LEASE_FILE}", output, ttl_s
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "pid_started": _process_start(pid), "token": self.token,
                "since": self._since, "renewed": time.time(), "ttl_s": self.ttl_s}

    def _current(self) -> dict[str, Any] | None:
        try:
            return read_json(self.fs, self.path)
        except (FileNotFoundError, OSError, ValueError):
            return None

    def holder_alive(self, lease: dict[str, Any]) -> bool:
        """Is the run that wrote `lease` still writing? Same host: its process says; elsewhere: its renewals."""
        if lease.get("token") == self.token:
            return False
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
            if lease["pid"] == os.getpid():
                return False  # an earlier run of this very process that did not let go
            return _alive(lease["pid"], lease.get("pid_started"))
        age = time.time() - float(lease.get("renewed", 0))
        return age < float(lease.get("ttl_s", self.ttl_s))

    def _refuse(self, lease: dict[str, Any]) -> LeaseHeldError:
        age = max(0.0, time.time() - float(lease.get("renewed", 0)))
        return LeaseHeldError(
            f"output {self.output} is being written by another run (pid {lease.get('pid')} on "
            f"{lease.get('host')}, since {lease.get('since')}, renewed {age:.0f} s ago); wait for it to end or "
            "stop it, or choose another output")

    def check(self) -> None:
        """Refuse (LeaseHeldError) while another live run holds the lease; reads only."""
        current = self._current()
        if current is not None and self.holder_alive(current):
            raise self._refuse(current)

    def acquire(self) -> None:
        self.check()
        self._since = datetime.now(UTC).isoformat(timespec="seconds")
        write_json(self.fs, self.path, self._record())
        # Two runs starting together both wrote; the later rename won. Read back after a moment so the
        # loser sees the winner's token and steps aside instead of both going on.
        time.sleep(0.05)
        current = self._current()
        if current is None or current.get("token") != self.token:
            raise self._refuse(current or {})
        self.held = True
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 6)):
            current = self._current()
            if current is not None and current.get("token") != self.token:
                self.lost = True  # taken over (we were presumed dead): stop renewing, never steal it back
                return
            with contextlib.suppress(OSError):
                write_json(self.fs, self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held and not self.lost:
            current = self._current()
            if current is not None and current.get("token") == self.token:
                with contextlib.suppress(OSError):
                    self.fs.delete_file(self.path)
        self.held = False


# ------------------------------------------------------------------------------------------ the directory
class RunDir:
    """One job's OUTPUT. `owns(name)` says which top-level names (files or folders) the job itself writes;
    `exclusive` jobs (the Parquet datasets of mine and extract) refuse a directory holding anything else."""

    def __init__(self, output: str, job: str, owns: Callable[[str], bool], exclusive: bool = False) -> None:
        self.output, self.job, self.owns, self.exclusive = output, job, owns, exclusive
        self.fs, self.root = filesystem(output)
        self.lease: Lease | None = None
        self._created = False

    # -- paths and small files
    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return _kind(self.fs, self.path(rel)) != pafs.FileType.NotFound

    def read(self, rel: str) -> Any:
        return read_json(self.fs, self.path(rel))

    def read_or_none(self, rel: str) -> Any:
        return self.read(rel) if _kind(self.fs, self.path(rel)) == pafs.FileType.File else None

    def write(self, rel: str, obj: Any) -> None:
        write_json(self.fs, self.path(rel), obj)

    def delete(self, rel: str) -> None:
        delete_path(self.fs, self.path(rel))

    def names(self, mark_dirs: bool = False) -> list[str]:
        """Top-level names in OUTPUT ([] when it does not exist); folders end in "/" with `mark_dirs`."""
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name + ("/" if mark_dirs and i.type == pafs.FileType.Directory else "")
                      for i in info)

    # -- before a run
    def check(self) -> dict[str, Any] | None:
        """Refuse an OUTPUT this job may not write into; return the earlier run's job record, if any.
        Reads only, so a refusal costs nothing and changes nothing."""
        kind = _kind(self.fs, self.root)
        if kind == pafs.FileType.File:
            raise OutputExistsError(f"output {self.output} is a file: name a directory (new or empty) for the output")
        if kind == pafs.FileType.NotFound:
            return None
        if self.lease is None or not self.lease.held:
            Lease(self.fs, self.root, self.output).check()  # another run writing here comes first
        names = [n for n in self.names(mark_dirs=True) if n.rstrip("/") != META]
        foreign = [n for n in names if not self.owns(n.rstrip("/"))]
        record = self.read_or_none(JOB_FILE)
        if record is None:
            if names:  # files, but no record of a run of ours: nothing here is provably ours
                raise OutputExistsError(
                    f"output {self.output} is not empty and was not written by this tool (found: {_names(names)}); "
                    "name a new or empty directory (--overwrite and --resume only touch this tool's own outputs)")
            return None
        if record.get("job") != self.job:
            raise OutputExistsError(
                f"output {self.output} holds the output of a different job (`splinter {record.get('job')}`, not "
                f"{self.job}); name another output directory")
        if foreign and self.exclusive:
            raise OutputExistsError(
                f"output {self.output} holds files this tool did not write ({_names(foreign)}); move them "
                "elsewhere or name another output directory")
        return record

    def acquire(self) -> None:
        """Take the lease (creating OUTPUT if needed); refused while another live run holds it."""
        if self.lease is not None and self.lease.held:
            return
        self._created = _kind(self.fs, self.root) == pafs.FileType.NotFound
        try:
            self.fs.create_dir(self.path(META), recursive=True)
        except OSError as exc:  # a parent that is a file, or not writable: the user's to fix
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise ConfigError(f"cannot create the output directory {self.output}: {reason}; choose another "
                              "output path") from None
        self.lease = Lease(self.fs, self.root, self.output)
        try:
            self.lease.acquire()
        except BaseException:
            self._tidy()
            raise

    def release(self) -> None:
        """Let go of the lease; a directory this run created and left empty goes too."""
        if self.lease is not None:
            self.lease.release()
        self._tidy()

    def _tidy(self) -> None:
        if not self._created:
            return
        with contextlib.suppress(OSError):
            if self.names() == [META] and not self.fs.get_file_info(
                    pafs.FileSelector(self.path(META), allow_not_found=True)):
                self.fs.delete_dir(self.root)

    @contextlib.contextmanager
    def held(self) -> Iterator[RunDir]:
        """The lease for the duration of the block (a block inside another keeps it until the outer ends)."""
        if self.lease is not None and self.lease.held:
            yield self
            return
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def reset(self) -> None:
        """Delete the earlier run: our own top-level files and bookkeeping, never the lease or anyone
        else's files."""
        for name in self.names():
            if name != META and (self.owns(name) or self.exclusive):
                self.delete(name)
        info = self.fs.get_file_info(pafs.FileSelector(self.path(META), allow_not_found=True))
        for item in info:
            if item.base_name != LEASE_FILE.rsplit("/", 1)[1]:
                delete_path(self.fs, item.path)

    def begin(self, settings: dict[str, Any], *, overwrite: bool, continues: bool,
              fingerprint: str | None = None, extra: dict[str, Any] | None = None,
              describe: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any] | None:
        """Start (or continue) this job's run in OUTPUT under the lease; return the earlier run's record
        when this run continues it, else None (a fresh start: OUTPUT holds nothing of an earlier run).

        `continues`: the caller wants to continue an earlier run (--resume, or a training job's rerun).
        Continuing needs the same settings (and fingerprint); --overwrite replaces whatever run is there."""
        self.acquire()
        previous = self.check()
        if previous is not None and overwrite:
            self.reset()
            previous = None
        elif previous is not None and continues:
            if previous.get("settings") != settings or previous.get("fingerprint") != fingerprint:
                said = describe(previous) if describe else _describe_change(previous.get("settings") or {}, settings)
                raise OutputExistsError(
                    f"cannot continue the run in {self.output}: it was made with other settings ({said}); rerun "
                    "with the same settings, or use --overwrite or a new output")
        elif previous is not None:
            self.reset()
            previous = None
        # A fresh run, or a continued one: the record says what is writing here now. Completion and stats
        # are the end of a run: a continued run earns them again.
        if previous is not None:
            for rel in (SUCCESS_FILE, STATS_FILE):
                self.delete(rel)
        self.write(JOB_FILE, {"job": self.job, "settings": settings, "fingerprint": fingerprint, **(extra or {})})
        return previous

    def finished(self, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The summary of a complete run made with these `settings` (rerunning it has nothing to do), else None."""
        record = self.read_or_none(JOB_FILE)
        if record is None or record.get("settings") != settings or not self.is_complete():
            return None
        return self.read_or_none(STATS_FILE)

    # -- after a run
    def complete(self, stats: dict[str, Any]) -> None:
        """The run finished: its summary, then the completion marker (last)."""
        self.write(STATS_FILE, stats)
        self.write(SUCCESS_FILE, {"job": self.job, "finished": datetime.now(UTC).isoformat(timespec="seconds")})

    def is_complete(self) -> bool:
        return _kind(self.fs, self.path(SUCCESS_FILE)) == pafs.FileType.File


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    """Nested groups of settings (training, hparams) by their own key names, as the flags name them; a
    top-level setting wins over a nested one of the same name (what the user gave over what it resolved to)."""
    out = {key: value for key, value in settings.items() if not isinstance(value, dict)}
    for value in settings.values():
        if isinstance(value, dict):
            out.update({k: v for k, v in _flat(value).items() if k not in out})
    return out


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first setting that differs, as `key: then there, now now`."""
    then, now = _flat(old), _flat(new)
    for key, value in now.items():
        if then.get(key) != value:
            return f"{key}: {then.get(key)!r} there, {value!r} now"
    return "settings differ"
