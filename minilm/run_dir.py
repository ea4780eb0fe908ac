"""One run folder, one run: the rules that keep --out_dir from mixing two runs.

    lock = RunLock.acquire(out_dir)     # a second train.py on the same folder is a one-line error
    check_fresh_start(out_dir, ...)     # a fresh run never lands among another run's checkpoints
    keep_metrics_up_to(out_dir, step)   # a resumed run drops the rows it is about to redo

Why each rule exists (each was a silent data loss before):
  * Two processes on one folder wrote the same temporary token file (one of them then trained on
    zeros plus the other's ids), interleaved metrics.jsonl, and one run's checkpoint retention
    deleted the other's newest checkpoint. The lock is an advisory `flock` on out_dir/.lock held
    for the whole run: the kernel drops it when the process dies, however it dies (kill -9 too),
    so a crashed run never leaves a stale lock behind. The file also records the holder's pid and
    host, to name them in the error. Where flock is not available (Windows), or the lock file is
    on a filesystem that ignores it, the pid in the file is checked instead: a lock whose process
    is gone (on this host) is stale and taken over.
  * A fresh run in a folder holding an older run's checkpoints kept the highest steps at every
    save, so it deleted each of its own checkpoints right after writing it, and --resume or
    sample.py then took the old model. A fresh run there is refused unless --overwrite says to
    delete them (or --resume continues them).
  * After a resume, the metrics rows between the checkpoint and the crash were logged twice:
    the rows past the resumed step are dropped before training goes on.
"""
from __future__ import annotations

import json
import os
import socket

from minilm.checkpoint import atomic_write_bytes, list_checkpoints
from minilm.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive lock on a run folder, held until release() or the process's end."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, out_dir: str) -> "RunLock":
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            holder = _read_holder(fd)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(_busy_message(out_dir, holder)) from None
                except OSError:   # a filesystem without flock support: fall back to the pid
                    _refuse_if_holder_alive(out_dir, holder)
            else:
                _refuse_if_holder_alive(out_dir, holder)
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)   # an empty lock file names no holder
        except OSError:
            pass
        os.close(self.fd)              # closing drops the flock
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy_message(out_dir: str, holder: dict) -> str:
    who = f"process {holder['pid']} on {holder.get('host', '?')}" if "pid" in holder else "another process"
    return (f"--out_dir {out_dir} is in use by another run ({who}); wait for it to finish, or choose "
            "another --out_dir")


def _refuse_if_holder_alive(out_dir: str, holder: dict) -> None:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    if holder.get("host") == socket.gethostname() and not _process_alive(pid):
        return   # stale: the run that held it is gone
    if holder.get("host") != socket.gethostname():
        raise UserError(_busy_message(out_dir, holder) + f"; if no run is active, delete "
                        f"{os.path.join(out_dir, LOCK_NAME)}")
    raise UserError(_busy_message(out_dir, holder))


def check_fresh_start(out_dir: str, overwrite: bool, keep: tuple[str, ...] = ()) -> list[str]:
    """Before a fresh run (no --resume) in out_dir: refuse when it holds checkpoints, unless
    `overwrite`; then delete them (except the paths in `keep`, e.g. an --init_from parent there,
    which is refused instead) and the old metrics. Returns the deleted checkpoint paths."""
    existing = list_checkpoints(out_dir)
    if existing and not overwrite:
        raise UserError(f"--out_dir {out_dir} already holds {len(existing)} checkpoint(s) of another run "
                        f"(newest {os.path.basename(existing[-1])}); continue it with --resume, start from its "
                        "weights in a new folder with --init_from, choose another --out_dir, or pass "
                        "--overwrite to delete them")
    doomed = [p for p in existing if os.path.abspath(p) not in {os.path.abspath(k) for k in keep}]
    if len(doomed) < len(existing):
        parent = next(p for p in existing if p not in doomed)
        raise UserError(f"--overwrite would delete {parent}, the checkpoint --init_from starts from; copy it "
                        "elsewhere first or choose another --out_dir")
    for path in doomed:
        os.unlink(path)
    metrics = os.path.join(out_dir, METRICS_NAME)
    if os.path.exists(metrics):
        os.unlink(metrics)   # rows of another run (or of one that never saved) would mix with ours
    return doomed


def keep_metrics_up_to(out_dir: str, step: int) -> int:
    """Drop metrics.jsonl rows logged after `step` (the steps a resumed run is about to redo), and
    any partial last line a crash left. Rewritten atomically. Returns the number of rows dropped."""
    path = os.path.join(out_dir, METRICS_NAME)
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept, dropped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if int(row.get("step", 0)) <= step:
                kept.append(line)
                continue
        except (ValueError, TypeError, AttributeError):
            pass    # a torn line from a crash mid-write
        dropped += 1
    if dropped:
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    return dropped
