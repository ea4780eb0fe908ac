"""Checkpoints: one self-contained file, written atomically, loaded without unpickling code.

A checkpoint holds everything needed to resume or to sample: the config (as a dict), the
objective's state_dict (the unwrapped, uncompiled module), optimizer and scaler states, the step,
RNG states, and the tokenizer's sentencepiece bytes (as a uint8 tensor). Nothing in it needs
`pickle` to run code, so it is loaded with `torch.load(..., weights_only=True)`: a file carrying
a malicious payload is refused instead of executed.

Writing: to a temporary file in the same folder, flushed and fsynced, then renamed over the
target. A crash at any moment leaves either the old file or the new one, never half of one.
Only regular files are ever replaced or opened: a FIFO, device, socket or folder at a
checkpoint's path is a one-line error (opening a FIFO to read would wait forever).
"""
from __future__ import annotations

import errno
import io
import os
import secrets
import stat
import warnings
from typing import BinaryIO, Callable

import torch

from minilm.checkpoint_checks import check_checkpoint
from minilm.errors import UserError


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """write(f) into a new temporary file beside `path`, flushed and fsynced, then renamed over
    `path`. Only a missing path or a regular file is replaced (through a symlink: the file it
    points to, the link stays); anything else there is a one-line UserError, since the rename
    would put a regular file in the place of a device, FIFO, socket or folder. A new file gets
    the permissions the umask gives any new file; a replaced one keeps its own."""
    target = replaceable_target(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = create_temporary_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        replaceable_target(path)   # again: something else may have appeared there meanwhile
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory


def atomic_write_bytes(path: str, data: bytes) -> None:
    """`data` as the file at `path`, written atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def not_a_regular_file(path: str) -> str | None:
    """What `path` is when it exists but is not a regular file (nor a symlink to one), for a
    message: "a FIFO", "a folder", ...; None for a regular file and for nothing there. Asked
    before opening a file: opening a FIFO to read waits for a writer, forever if none comes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symlink" if os.path.islink(path) else None
    except OSError as err:
        return "a symlink loop" if err.errno == errno.ELOOP else f"unreadable ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def replaceable_target(path: str) -> str:
    """The file that writing `path` replaces (`path`, or the file a symlink there points to);
    a UserError when something other than a regular file is there."""
    odd = not_a_regular_file(path)
    if odd is not None:
        raise UserError(f"will not write {path}: it is {odd}, not a regular file; choose another path, or move "
                        "it away first")
    return os.path.realpath(path)


def create_temporary_beside(target: str) -> tuple[int, str]:
    """(fd, path) of a new empty file .tmp-NAME-RANDOM in target's folder. Created with mode 0o666,
    as open() creates files, so the umask (and a folder's default ACL) decides its permissions
    (tempfile.mkstemp's 0600 would make every checkpoint private); when it is to replace an
    existing file, it takes that file's permissions instead, as an editor saving it would."""
    folder, name = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{name}-{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode) & 0o777)
        except FileNotFoundError:
            pass   # a new file: the umask's permissions stand
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {folder}")


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save into memory, then write atomically. A failed write (a disk that filled up
    during the run, say) is a one-line UserError; the checkpoints already there are untouched."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:
        older = list_checkpoints(os.path.dirname(path))
        kept = f"; {older[-1]} is intact, resume from it with --resume" if older else ""
        raise UserError(f"could not write checkpoint {path}: {err.strerror or err}{kept}") from None


RESUME_KEYS = ("optimizer", "step", "rng")  # what resuming needs beyond config and model


def load_checkpoint(path: str, map_location="cpu", resumable: bool = False, flag: str = "--ckpt") -> dict:
    """The checkpoint's dict, loaded with weights_only=True; a one-line UserError for a missing,
    truncated, unsafe or foreign file. resumable: also require what resuming training needs.
    flag: the caller's flag that names the file, for the message about a missing one."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; pass an existing checkpoint file to {flag}, or train one "
                        "first with train.py")
    refuse_non_regular(path, flag)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(f"cannot load checkpoint {path}: {why_unloadable(err)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict) or "model" not in state:
        raise UserError(f"{path} is not a minilm checkpoint (no config/model inside)")
    missing = [k for k in RESUME_KEYS if state.get(k) is None] if resumable else []
    if missing:
        raise UserError(f"{path} cannot be resumed from: it has no {', '.join(missing)} (not written by "
                        "train.py); start a new run instead")
    check_checkpoint(state, path)   # its config, weights and tokenizer, before anything is built
    return state


def refuse_non_regular(path: str, flag: str) -> None:
    """A UserError for a checkpoint path that is not a regular file (a FIFO would hang torch.load)."""
    odd = not_a_regular_file(path)
    if odd is not None:
        raise UserError(f"{path} is {odd}, not a checkpoint file; pass a checkpoint file to {flag}")


def why_unloadable(err: Exception) -> str:
    """torch.load's error in one line: its first sentence. For a weights_only refusal, only torch's
    reason (the first sentence after "WeightsUnpickler error:"): the rest of torch's text advises
    loading with weights_only=False or allowlisting globals, either of which runs the file's code."""
    text = str(err)
    refused = "WeightsUnpickler error" in text or "Weights only load failed" in text
    if refused:
        text = text.partition("WeightsUnpickler error:")[2]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = lines[0].split(". ")[0].rstrip(".")[:200] if lines else ""
    if not refused:
        return f"it is truncated, corrupt or not a minilm checkpoint ({reason or type(err).__name__})"
    if not reason or "weights_only" in reason:  # never pass on advice to unpickle it anyway
        reason = "it holds more than tensors and plain data"
    return (f"it is corrupt, unsafe or not a minilm checkpoint; minilm refused to unpickle it ({reason}), "
            "since a file holding more than tensors and plain data can run code when loaded")


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


# ----------------------------------------------------------------------------- several checkpoints
# A run keeps its newest `keep` checkpoints as out_dir/ckpt-STEP.pt (zero-padded, so names sort
# by step). Resuming takes the newest one that loads: a file cut short by a crash or a full disk
# is skipped, with a note, in favour of the one before it.

def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"ckpt-{step:08d}.pt")


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint files of a run, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    names = [n for n in os.listdir(out_dir) if is_checkpoint_name(n)]
    return [os.path.join(out_dir, n) for n in sorted(names)]


def is_checkpoint_name(name: str) -> bool:
    """Whether a file name is one of a run's numbered checkpoints (ckpt-STEP.pt)."""
    return name.startswith("ckpt-") and name.endswith(".pt") and name[5:-3].isdigit()


def checkpoint_loads(path: str) -> bool:
    """Whether a checkpoint file opens: its zip directory and pickle read with weights_only, the
    tensors memory-mapped rather than read, so this costs little even for a large file. Only a
    regular file is opened (a FIFO named like a checkpoint would block the open forever)."""
    if not_a_regular_file(path) is not None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(state, dict) and isinstance(state.get("config"), dict) and "model" in state


def prune_checkpoints(out_dir: str, keep: int, loads=checkpoint_loads) -> list[str]:
    """Delete all but the newest `keep` checkpoints that load; returns the deleted paths.

    Only loadable files count: a damaged file with a high step (a crash mid-copy, a disk error)
    must not take a retention slot and push out the good checkpoints a resume would need. Damaged
    files are left alone (resume and sample.py skip them, and a later save at that step replaces
    them), and so is anything that is not a regular file. `loads` is a path -> bool test (the
    trainer passes a cached one)."""
    paths = [p for p in list_checkpoints(out_dir) if loads(p)]
    doomed = paths[:-keep] if keep > 0 else []
    for path in doomed:
        os.unlink(path)
    # temporary files of saves that were killed midway (the run's only writer is calling us)
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.startswith(".tmp-ckpt-") and stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    return doomed


def newest_loadable(out_dir: str, log=print, resumable: bool = True) -> tuple[str, dict]:
    """(path, state) of the newest checkpoint in out_dir that loads; UserError when none does.
    A damaged newer file is skipped with a note, and so is one that is not a regular file (never
    opened). resumable: also require what resuming needs."""
    paths = list_checkpoints(out_dir)
    if not paths:
        raise UserError(f"no checkpoint to resume in {out_dir}; train without --resume first" if resumable
                        else f"no checkpoint in {out_dir}; train one first with train.py, or pass a checkpoint file")
    for path in reversed(paths):
        odd = not_a_regular_file(path)
        if odd is not None:
            log(f"note: skipping {path}: it is {odd}, not a checkpoint file")
            continue
        try:
            return path, load_checkpoint(path, resumable=resumable)
        except UserError as err:
            log(f"note: skipping {path}: {err}")
    raise UserError(f"none of the {len(paths)} checkpoints in {out_dir} loads; they are all damaged")


def load_checkpoint_or_newest(path: str, log=print, flag: str = "--ckpt") -> tuple[str, dict]:
    """(path, state) for sample.py and --init_from: a file, or a run folder meaning its newest
    checkpoint that loads (a damaged newest one is skipped with a note, as --resume does).
    flag: the caller's flag that names `path`, for the messages."""
    if os.path.isdir(path):
        return newest_loadable(path, log=log, resumable=False)
    return path, load_checkpoint(path, flag=flag)
