"""One run folder, one run: the rules that keep --out_dir from mixing two runs, or a run and a
user's own files.

    lock = claim_run_dir(out_dir, fresh=..., overwrite=...)   # all four steps below, in order:
    check_run_dir(out_dir, fresh=..., overwrite=...)   # before anything is written: refuse, or allow
    lock = RunLock.acquire(out_dir)     # a second train.py on the same folder is a one-line error
    mark_run_dir(out_dir)               # the folder is minilm's from now on
    clear_earlier_run(out_dir, ...)     # once the new run's data is ready: the old run's files go
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
  * --overwrite deleted first and checked after: a typo in --data left the old checkpoints gone
    and no new run. The old run's files now go only once the new run's data is prepared, and all
    of them (RUN_NAMES): a best.pt left behind answered for the old model.
  * A fresh run wrote over a user's own metrics.jsonl, tokenizer.model or data/. Only a folder
    minilm made (MARK_NAME, or an older run's checkpoints or prepared data) has its run files
    replaced; elsewhere a run refuses to replace any name it writes, --overwrite or not.
  * After a resume, the metrics rows between the checkpoint and the crash were logged twice:
    the rows past the resumed step are dropped before training goes on.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import socket

from minilm.checkpoint import atomic_write_bytes, checkpoint_loads, list_checkpoints
from minilm.data import inspect_prepared
from minilm.errors import UserError
from minilm.faults import TENSORBOARD_NAME, check_writable
from minilm.trainer import BEST_NAME

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

LOCK_NAME = ".lock"
MARK_NAME = ".minilm-run"            # written when a run claims the folder: minilm made it
METRICS_NAME = "metrics.jsonl"
TOKENIZER_NAME = "tokenizer.model"
DATA_NAME = "data"                   # the prepared token files
WRITE_TEST_NAME = ".write-test"      # faults.check_writable's probe
TEMPORARY_PREFIX = ".tmp-"           # checkpoint.atomic_write_bytes' temporaries
# every name a run writes in its folder, besides ckpt-STEP.pt and the temporaries: what
# --overwrite deletes, and what a run refuses to replace in a folder minilm did not make
RUN_NAMES = (BEST_NAME, METRICS_NAME, TOKENIZER_NAME, DATA_NAME, TENSORBOARD_NAME, WRITE_TEST_NAME)
PREPARED_NAMES = (TOKENIZER_NAME, DATA_NAME)   # a fresh run's own by the time the old run is cleared


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


def is_run_output(name: str) -> bool:
    """Whether `name`, an entry of a run folder, is one a run writes (RUN_NAMES, ckpt-STEP.pt and
    the temporaries of atomic writes)."""
    return (name in RUN_NAMES or name.startswith(TEMPORARY_PREFIX)
            or (name.startswith("ckpt-") and name.endswith(".pt") and name[5:-3].isdigit()))


def run_outputs(out_dir: str) -> list[str]:
    """The names in out_dir a run writes, sorted; [] for a folder that does not exist."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir) if is_run_output(name))


def made_by_minilm(out_dir: str) -> bool:
    """Whether out_dir is a run folder: a run marked it when it claimed it, or (a folder from
    before the mark) a checkpoint in it loads, or its data/ holds minilm's prepared data."""
    if os.path.exists(os.path.join(out_dir, MARK_NAME)):
        return True
    best = os.path.join(out_dir, BEST_NAME)
    if any(checkpoint_loads(p) for p in list_checkpoints(out_dir) + ([best] if os.path.isfile(best) else [])):
        return True
    meta = inspect_prepared(os.path.join(out_dir, DATA_NAME))[0]
    return meta is not None and "tokenizer" in meta and "train_tokens" in meta


def check_run_dir(out_dir: str, fresh: bool, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Whether a run may use out_dir; reads only. Refused: a folder minilm did not make that holds
    a name a run writes (--overwrite or not: only minilm's own files are ever deleted); for a
    fresh run, a folder holding checkpoints unless `overwrite`, and an --overwrite that would
    delete a path in `keep` (an --init_from parent there)."""
    names = run_outputs(out_dir)
    if not names:
        return
    if not made_by_minilm(out_dir):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise UserError(f"--out_dir {out_dir} is not a minilm run folder but holds {shown}, which a run would "
                        f"{'delete' if overwrite else 'replace'}; choose another --out_dir (a new or empty folder), "
                        "or move those files away")
    if not fresh:
        return
    checkpoints = list_checkpoints(out_dir)
    previous = checkpoints + ([os.path.join(out_dir, BEST_NAME)] if BEST_NAME in names else [])
    if previous and not overwrite:
        newest = f" (newest {os.path.basename(checkpoints[-1])})" if checkpoints else ""
        raise UserError(f"--out_dir {out_dir} already holds {len(previous)} checkpoint(s) of another run{newest}; "
                        "continue it with --resume, start from its weights in a new folder with --init_from, "
                        "choose another --out_dir, or pass --overwrite to delete them")
    for path in keep:
        top = os.path.relpath(os.path.realpath(path), os.path.realpath(out_dir)).split(os.sep)[0]
        if top in names and top not in PREPARED_NAMES:
            raise UserError(f"--overwrite would delete {path}, the checkpoint --init_from starts from; copy it "
                            "elsewhere first or choose another --out_dir")


def check_data_outside(out_dir: str, flag: str, path: str) -> None:
    """Refuse data that is the run folder or lies inside it: a run writes there, and --overwrite
    deletes there. For a glob, its fixed leading folders are what counts."""
    parts = path.split(os.sep)
    fixed = os.sep.join(itertools.takewhile(lambda part: not glob.has_magic(part), parts)) or "."
    where, run = os.path.realpath(fixed), os.path.realpath(out_dir)
    if where == run or where.startswith(run.rstrip(os.sep) + os.sep):
        raise UserError(f"{flag} {path} is {'the' if where == run else 'inside the'} --out_dir {out_dir}, where a "
                        "run writes its files (and --overwrite deletes them); keep the data outside the run "
                        "folder: move it, or choose another --out_dir")


def mark_run_dir(out_dir: str) -> None:
    """Mark out_dir as a run folder (made_by_minilm), once its run holds the lock."""
    path = os.path.join(out_dir, MARK_NAME)
    if not os.path.exists(path):
        atomic_write_bytes(path, b'{"made_by": "minilm train.py"}\n')


def clear_previous_run(out_dir: str, keep: tuple[str, ...] = PREPARED_NAMES) -> list[str]:
    """Delete every file an earlier run left in out_dir (run_outputs), except the names in `keep`
    (the tokenizer and token files, which the new run has reused or made again by now). Call it
    with the lock held, after check_run_dir allowed it. Returns the deleted names."""
    doomed = [name for name in run_outputs(out_dir) if name not in keep]
    for name in doomed:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return doomed


def claim_run_dir(out_dir: str, fresh: bool, overwrite: bool, keep: tuple[str, ...] = ()) -> RunLock:
    """check_run_dir, a write test, then the lock and the mark: out_dir is this run's. Checked again
    under the lock, since the folder is this run's to judge only now. A refused run has written
    nothing but the lock file."""
    check_run_dir(out_dir, fresh=fresh, overwrite=overwrite, keep=keep)
    check_writable(out_dir)
    lock = RunLock.acquire(out_dir)
    try:
        check_run_dir(out_dir, fresh=fresh, overwrite=overwrite, keep=keep)
        mark_run_dir(out_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def clear_earlier_run(out_dir: str, overwrite: bool, log) -> None:
    """A fresh run, its data prepared and its model built: delete what an earlier run left in
    out_dir (with --overwrite its checkpoints; always its metrics and temporaries), and say so.
    Only now, so that a run stopped by bad input or a bad flag on the way here loses nothing. The
    tokenizer and token files are this run's by now (reused, or made again)."""
    deleted = clear_previous_run(out_dir)
    if deleted:
        checkpoints = [name for name in deleted if name.startswith("ckpt-")]
        parts = ([f"{len(checkpoints)} checkpoint(s)"] if checkpoints else []) + \
            [name for name in deleted if not name.startswith("ckpt-")]
        log(f"{'--overwrite: ' if overwrite else ''}deleted {', '.join(parts)} of the previous run in {out_dir}")


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
