"""One job per run directory: `<run dir>/run.lock`, taken by rank 0 at start-up, released at the end.

The lock file records its holder (host, pid, SLURM job, when it started, a random token) and is made
the way that is atomic on NFS and other shared file systems, without flock/fcntl (which NFS does not
always honour): the record is written to a file of its own, then hard-linked to `run.lock`; link()
fails if the name exists (open(2), O_EXCL). The holder refreshes the lock's mtime every HEARTBEAT_S
from a thread.

A second job finds the lock and refuses in one line naming the holder, unless the holder is provably
gone, and then takes the lock over:
- on the same machine (same boot and pid namespace): its process is not running (or the pid now
  belongs to a process that started later);
- anywhere: its heartbeat is older than STALE_AFTER_S (a killed job, a lost node). Hosts' clocks are
  assumed to agree to well within that.
An earlier attempt of the same job (a torchrun restart or SLURM requeue whose rank 0 moved to another
node) is waited for until its heartbeat goes stale, instead of refused at once. A takeover is itself
exclusive: the taker first link-creates a claim named after the stale lock's contents, so of several
jobs starting at once exactly one replaces it. A holder that finds its lock taken over (it was frozen for
longer than STALE_AFTER_S) stops at once, writing nothing more.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import dist

LOCK = "run.lock"
HEARTBEAT_S = 10.0  # how often the holder touches the lock
STALE_AFTER_S = 120.0  # a lock not touched for this long belongs to a job that is gone


class RunDirError(RuntimeError):
    """The run directory can't be used (another job holds it, or a path is in the way); one line."""


# What dtrain keeps in a run directory: (path, kind, who reports it). Anything else under that name is in
# the way and ends the run at start-up, not with a traceback in the middle of it.
LAYOUT = (
    ("checkpoints", "dir", "checkpoint"),
    ("checkpoints/latest", "link", "checkpoint"),
    ("checkpoints/best", "link", "checkpoint"),
    ("metrics.jsonl", "file", "log"),
    ("config.yaml", "file", "run"),
    ("sample_keys", "dir", "log"),
    ("wandb", "dir", "log"),
    ("metrics.csv", "file", "log"),
    ("tensorboard", "dir", "log"),
    ("summary.json", "file", "run"),
)


@contextlib.contextmanager
def hold(run_dir: Path, dist_info: dist.DistInfo, log: Callable[[str], None]) -> Iterator[None]:
    """Collective. Rank 0 makes the run directory and takes its lock; every rank gets rank 0's outcome, so
    all of them go on or all raise the same RunDirError. The lock is released when the block ends (and
    the directory removed again if this job made it and wrote nothing into it)."""
    lock, problem, made = None, None, False
    if dist_info.is_global_zero:
        try:
            made = not os.path.lexists(run_dir)
            make_run_dir(run_dir)
            lock = RunLock(run_dir)
            lock.acquire(log)
            check_layout(run_dir)
        except RunDirError as e:
            problem = str(e)
    problem = dist.broadcast_object(problem)
    try:
        if problem:
            raise RunDirError(problem)
        yield
    finally:
        if lock is not None:
            lock.release()
        if made:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        culprit = next(
            (p for p in [*reversed(run_dir.parents), run_dir] if os.path.lexists(p) and not p.is_dir()), None
        )
        if culprit is not None:
            raise RunDirError(
                f"run: {culprit} is {_kind(culprit)}, not a directory; move it away or choose "
                "another run.dir or run.name"
            ) from None
        raise RunDirError(f"run: cannot create {run_dir} ({e.strerror or e})") from None


def check_layout(run_dir: Path) -> None:
    for name, kind, owner in LAYOUT:
        path = run_dir / name
        if not os.path.lexists(path):
            continue
        ok = {"dir": path.is_dir(), "file": path.is_file(), "link": path.is_symlink()}[kind]
        if not ok:
            want = {"dir": "a directory", "file": "a file", "link": "a symbolic link"}[kind]
            raise RunDirError(
                f"{owner}: {path} is {_kind(path)} where dtrain keeps {want}; move it away or use another run.name"
            )


def _kind(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    return "a directory" if path.is_dir() else "a file" if path.is_file() else "not a regular file"


# ---- the lock ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """A lock file as read: its bytes and mtime (both change only when someone writes or touches it)."""

    raw: bytes
    mtime: float

    @property
    def record(self) -> dict:
        try:
            record = json.loads(self.raw)
            return record if isinstance(record, dict) else {}
        except ValueError:  # written by hand, or by something else: judged by its heartbeat alone
            return {}


class RunLock:
    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.dir, self.path = Path(run_dir), Path(run_dir) / LOCK
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "torchelastic_run": os.environ.get("TORCHELASTIC_RUN_ID"),
            "machine": _machine(),
            "process_start": _process_start(os.getpid()),
            "started": time.time(),
            "token": uuid.uuid4().hex,
        }
        self.raw = json.dumps(self.me).encode()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self, log: Callable[[str], None]) -> None:
        """Take the lock, taking it over from a holder that is gone; RunDirError naming a live holder."""
        give_up = None
        while True:
            if self._create(self.path):
                break
            seen = self._read()
            if seen is None:  # released meanwhile
                continue
            why = self._gone(seen)
            if why and self._take_over(seen):
                log(f"run: took over {self.path} from {_describe(seen.record)}: {why}")
                break
            if not why and give_up is None:  # an earlier attempt of this job may have just died: wait for it
                give_up = time.monotonic() + (self.stale_after_s + self.heartbeat_s if self._same_job(seen) else 0)
            if give_up is not None and time.monotonic() >= give_up:
                raise RunDirError(self._refusal(seen))
            time.sleep(0.2)
        self._thread = threading.Thread(target=self._beat, name="dtrain-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        seen = self._read()
        if seen is not None and seen.raw == self.raw:
            self.path.unlink(missing_ok=True)

    # ---- how -------------------------------------------------------------------------------------
    def _create(self, path: Path) -> bool:
        """Make `path` hold this job's record, atomically and only if it does not exist."""
        own = self.dir / f".{path.name}.{self.me['token']}"
        try:
            own.write_bytes(self.raw)
            try:
                os.link(own, path)
                return True
            except FileExistsError:
                # over NFS, a link whose reply was lost is sent again and fails although the first one
                # worked: the link count of our own file tells (open(2), O_EXCL)
                return os.stat(own).st_nlink == 2
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                return self._create_exclusive(path)  # no hard links here (some FUSE mounts)
            finally:
                own.unlink(missing_ok=True)
        except OSError as e:
            raise RunDirError(f"run: cannot create {path} ({e.strerror or e})") from None

    def _create_exclusive(self, path: Path) -> bool:
        """O_EXCL where link() is not supported: a reader may see the file empty for a moment, and then
        judges it by its (fresh) mtime alone."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self.raw)
        return True

    def _read(self, path: Optional[Path] = None) -> Optional[Seen]:
        try:
            with open(path or self.path, "rb") as f:  # open, then fstat: NFS revalidates attributes on open
                return Seen(f.read(), os.fstat(f.fileno()).st_mtime)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RunDirError(f"run: cannot read {path or self.path} ({e.strerror or e})") from None

    def _gone(self, seen: Seen) -> Optional[str]:
        """Why the holder of `seen` is provably gone, or None."""
        record = seen.record
        pid = record.get("pid")
        if record.get("machine") == self.me["machine"] and isinstance(pid, int) and pid > 0:
            if _process_start(pid) != record.get("process_start"):
                return f"its process {pid} is no longer running"
            return None  # alive here: never stale, however old its heartbeat (it may be stopped, not dead)
        age = time.time() - seen.mtime
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (a lock is stale after {self.stale_after_s:g} s)"
        return None

    def _same_job(self, seen: Seen) -> bool:
        record = seen.record
        return any(
            self.me[k] and self.me[k] != "none" and record.get(k) == self.me[k]
            for k in ("slurm_job", "torchelastic_run")
        )

    def _take_over(self, seen: Seen) -> bool:
        """Replace the stale lock `seen` with ours, unless another job does so first or it changed."""
        claim = self.dir / f"{LOCK}.takeover-{hashlib.sha256(seen.raw).hexdigest()[:16]}"
        if not self._create(claim):
            stuck = self._read(claim)
            if stuck is not None and time.time() - stuck.mtime > self.stale_after_s:
                claim.unlink(missing_ok=True)  # its taker died in the middle; the next look retries
            return False
        try:
            if self._read() != seen:  # its holder touched it after all, or it was released
                return False
            own = self.dir / f".{LOCK}.{self.me['token']}"
            own.write_bytes(self.raw)
            os.replace(own, self.path)
            return True
        finally:
            claim.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                seen = self._read()
                if seen is None and self._create(self.path):  # removed by hand: put it back
                    continue
                if seen is None or seen.raw != self.raw:
                    now = self._read()
                    holder = _describe(now.record) if now is not None else "another job"
                    os.write(
                        2,
                        f"dtrain: error: run: {self.path} was taken over by {holder} (this job's heartbeat "
                        f"stopped for over {self.stale_after_s:g} s); stopping without writing more\n".encode(),
                    )
                    os._exit(2)
                os.utime(self.path)
            except (OSError, RunDirError):  # a file-system hiccup: try again at the next beat
                continue

    def _refusal(self, seen: Seen) -> str:
        record = seen.record
        age = time.time() - seen.mtime
        elsewhere = record.get("machine") != self.me["machine"]
        return (
            f"run: {self.dir} is in use by {_describe(record)} (heartbeat {age:.0f} s ago); wait for it to end "
            "or use another run.name"
            + (
                f" (a lock from another host is taken over once its heartbeat is {self.stale_after_s:g} s old)"
                if elsewhere
                else ""
            )
        )


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "an unknown job (unreadable lock file)"
    job = f", SLURM job {record['slurm_job']}" if record.get("slurm_job") else ""
    return f"host {record.get('host')}, pid {record['pid']}{job}"


def _machine() -> str:
    """This machine and pid namespace: where a pid means the same process (else the host name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _process_start(pid: int) -> Optional[str]:
    """When process `pid` started (clock ticks after boot, from /proc), which tells it from a later process
    given the same pid; None when there is no such process or it is a zombie. Without /proc: "?" while a
    process of that pid exists."""
    if Path("/proc/self/stat").exists():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if fields[0] in ("Z", "X") else fields[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # someone else's process
        pass
    return "?"
