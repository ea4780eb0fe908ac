"""Tokenizing a document source once into token files (prepare), and checking them (load_meta).

    prepare(source, tokenizer, folder) -> folder/train.bin, folder/val.bin, folder/meta.json,
                                          folder/tokenizer.model (the tokenizer that made them)
Worker processes encode ~1 MB jobs while this process appends the ids to the files; all or
nothing (.tmp files renamed when complete, meta.json last, atomically).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import threading
from collections.abc import Iterator

import numpy as np

from minilm.checkpoint import atomic_write_bytes
from minilm.data.reading import (
    BUILTIN,
    CHUNK_CHARS,
    PROGRESS_EVERY,
    Progress,
    ReadStats,
    _reason,
    display,
    iter_pieces,
    resolve_files,
)
from minilm.errors import UserError
from minilm.tokenizer import EOS_ID, Tokenizer, tokenizer_from_bytes


class Stopped(BaseException):
    """A SIGTERM while preparing data (see stop_on_sigterm). A BaseException, like the
    KeyboardInterrupt of Ctrl-C, so it unwinds through every `finally` that cleans up."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def stop_on_sigterm():
    """Within this block SIGTERM raises Stopped in the main thread, instead of killing the process
    on the spot (which leaves .tmp files behind, and pool workers printing BrokenPipe tracebacks)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def handler(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer  # one tokenizer per worker process, built once
    _worker_tokenizer = tokenizer_from_bytes(model_bytes)


def _encode_job(job: list[tuple[str, bool, bool]]) -> tuple[list[tuple[np.ndarray, bool]], int]:
    """Encode a list of (text, ends_document, is_val); append <eos> where a document ends.
    Returns the encoded pieces and the characters they hold (for the progress line)."""
    tok = _worker_tokenizer
    ids = tok.encode_batch([text for text, _, _ in job])
    out = []
    for (_, ends, is_val), piece in zip(job, ids):
        if ends:
            piece = piece + [EOS_ID]
        out.append((np.asarray(piece, dtype=np.uint32), is_val))
    return out, sum(len(text) for text, _, _ in job)


@contextlib.contextmanager
def _signals_blocked():
    """SIGINT and SIGTERM held back (delivered on exit) in this thread and the processes it forks."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_main(model_bytes: bytes, conn) -> None:
    """A tokenizing process: encode each job that comes down `conn` and send back (True, result),
    or (False, the exception); None ends it, and so does its parent going away."""
    # Ctrl-C reaches every process of the terminal's process group: only the parent decides to
    # stop (and kills its workers). A SIGTERM just ends a worker, not raising the Stopped of the
    # parent's handler that a forked worker inherits. The parent blocked both signals around the
    # start (_signals_blocked), so none arrives before these lines.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        _init_worker(model_bytes)
        while (job := conn.recv()) is not None:
            try:
                reply = (True, _encode_job(job))
            except Exception as err:  # noqa: BLE001 - handed to the parent, which raises it
                reply = (False, err)
            conn.send(reply)
    except (EOFError, OSError):
        pass  # the parent is gone: nothing left to do, and nobody to print a traceback for


class _EncoderPool:
    """Worker processes that encode jobs; `map` hands back the results in the order of the jobs.

    Not multiprocessing.Pool: its workers wait for jobs holding one shared lock, and a worker
    killed while waiting (a SIGTERM to the whole process group kills the idle ones) holds it
    forever, so Pool.terminate() hangs. Here each worker has its own pipe, and stopping is a
    kill. A worker gets a job only when it is idle, and at most 2 jobs per worker are read ahead
    of the oldest unfinished one, so memory stays bounded whatever the corpus size.
    """

    def __init__(self, model_bytes: bytes, workers: int):
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.processes, self.conns = [], []
        try:
            with _signals_blocked():  # the workers unblock them in _worker_main
                for _ in range(workers):
                    parent_end, child_end = ctx.Pipe()
                    process = ctx.Process(target=_worker_main, args=(model_bytes, child_end), daemon=True)
                    process.start()
                    child_end.close()
                    self.processes.append(process)
                    self.conns.append(parent_end)
        except BaseException:
            # a Ctrl-C held back while the workers started is raised as the signals are unblocked,
            # before the caller holds the pool: kill what was started here, or exit would wait
            # for workers that may not have reached their own signal set-up yet
            self.kill()
            raise

    def map(self, jobs) -> Iterator:
        jobs = iter(jobs)
        idle = list(range(len(self.conns)))
        running: dict[int, int] = {}      # worker -> index of its job
        finished: dict[int, object] = {}  # job index -> result, until its turn comes
        handed_out, handed_back = 0, 0
        while True:
            while idle and handed_out - handed_back < 2 * len(self.conns):
                job = next(jobs, None)
                if job is None:
                    break
                worker = idle.pop()
                self.conns[worker].send(job)
                running[worker] = handed_out
                handed_out += 1
            if not running:
                return
            for conn in mp.connection.wait([self.conns[w] for w in running]):
                worker = self.conns.index(conn)
                finished[running.pop(worker)] = self._receive(worker)
                idle.append(worker)
            while handed_back in finished:
                yield finished.pop(handed_back)
                handed_back += 1

    def _receive(self, worker: int):
        try:
            ok, result = self.conns[worker].recv()
        except (EOFError, OSError):  # the worker died
            process = self.processes[worker]
            process.join(1)
            if process.exitcode in (-signal.SIGTERM, -signal.SIGINT):
                raise Stopped(-process.exitcode) from None  # told to stop, like the rest of its group
            raise UserError(f"a tokenizing worker process ended unexpectedly (exit code {process.exitcode}, "
                            "out of memory?); try a smaller --num_workers") from None
        if not ok:
            raise result
        return result

    def close(self) -> None:
        for conn in self.conns:
            conn.send(None)
        for process in self.processes:
            process.join()

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.join()


@contextlib.contextmanager
def _encoder(tokenizer: Tokenizer, workers: int):
    """A function jobs -> their _encode_job results, in order: in this process for one worker,
    else from worker processes, which are killed, not waited for, on an error, Ctrl-C or SIGTERM."""
    if workers <= 1:
        _init_worker(tokenizer.model_bytes)
        yield lambda jobs: map(_encode_job, jobs)
        return
    pool = _EncoderPool(tokenizer.model_bytes, workers)
    try:
        yield pool.map
    except BaseException:
        pool.kill()
        raise
    pool.close()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.model_bytes).hexdigest()[:16]


def _jobs(pieces, job_chars: int = 1 << 18):
    job, size = [], 0
    for item in pieces:
        job.append(item)
        size += len(item[0])
        if size >= job_chars:
            yield job
            job, size = [], 0
    if job:
        yield job


def _write_failure(folder: str, err: OSError) -> str:
    """The one-line message for a token file or meta.json that could not be written."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 1e6:,.0f} MB free"
        except OSError:
            free = "free space unknown"
        return (f"no space left to prepare the data in {display(folder)} ({free}, {err.strerror}); "
                "free some space or pass an --out_dir on another disk")
    return f"cannot write the prepared data in {display(folder)}: {_reason(err)}"


def prepare(source: str, tokenizer: Tokenizer, folder: str, *, text_field: str = "text",
            val_fraction: float = 0.05, num_workers: int = 0, log=print, files: list[str] | None = None,
            extra_meta: dict | None = None, progress_every: float = PROGRESS_EVERY) -> dict:
    """Tokenize `source` into folder/train.bin and folder/val.bin; return (and save) the meta.

    files: the source's files when already resolved (else resolve_files, leaving out `folder`);
    extra_meta: more entries for meta.json (train.py records what the data was made from).
    A progress line comes every `progress_every` seconds of a long pass.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if files is None and source != BUILTIN:
        files = resolve_files(source, exclude=folder, log=log)
    # pass 1: count documents and characters, without tokenizing, to place the split
    count = ReadStats()
    for _ in iter_pieces(source, text_field, count, files=files,
                         progress=Progress(log, "counting documents", every=progress_every)):
        pass
    if count.chars == 0 or count.documents == 0:
        raise UserError(f"--data {display(source)} holds no text")
    single = count.documents == 1
    n_val = max(1, round(val_fraction * count.documents))
    # evenly spaced validation documents: index i is val when floor((i+1)*k/n) > floor(i*k/n)
    is_val_doc = lambda i: (i + 1) * n_val // count.documents > i * n_val // count.documents
    chunk = max(1, min(CHUNK_CHARS, count.chars // 200)) if single else CHUNK_CHARS

    stats = ReadStats()

    def labelled():
        doc, seen = 0, 0
        for text, ends in iter_pieces(source, text_field, stats, chunk_chars=chunk, files=files):
            if single:
                in_val = seen >= (1 - val_fraction) * count.chars
                seen += len(text)
                yield text, ends or (not in_val and seen >= (1 - val_fraction) * count.chars), in_val
            else:
                yield text, ends, is_val_doc(doc)
                doc += ends

    os.makedirs(folder, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    paths = {False: os.path.join(folder, "train.bin"), True: os.path.join(folder, "val.bin")}
    tmp = {k: v + ".tmp" for k, v in paths.items()}
    counts = {False: 0, True: 0}
    docs = {False: 0, True: 0}
    workers = num_workers or os.cpu_count() or 1
    log(f"tokenizing {count.chars:,} characters in {count.documents:,} documents with {workers} "
        f"worker{'s' if workers > 1 else ''}")
    progress = Progress(log, "tokenizing", total=count.chars, every=progress_every)
    with _encoder(tokenizer, workers) as encode, writing_prepared(folder, tmp):
        with open(tmp[False], "wb") as train_file, open(tmp[True], "wb") as val_file:
            out = {False: train_file, True: val_file}
            for job_result, chars in encode(_jobs(labelled())):
                for ids, is_val in job_result:
                    out[is_val].write(ids.astype(dtype).tobytes())
                    counts[is_val] += len(ids)
                    docs[is_val] += int(len(ids) > 0 and ids[-1] == EOS_ID)
                progress.add(chars)
        meta = dict(vocab_size=tokenizer.vocab_size, dtype=np.dtype(dtype).name,
                    train_tokens=counts[False], val_tokens=counts[True],
                    train_documents=docs[False], val_documents=docs[True], source=source,
                    files=stats.files, chars=stats.chars, replaced_invalid_utf8=stats.replaced,
                    tokenizer=tokenizer_fingerprint(tokenizer), **(extra_meta or {}))
        _publish(folder, tmp, paths, tokenizer, meta)
    log(f"prepared {display(source)}: {stats.documents} documents, {stats.chars:,} characters -> "
        f"{counts[False]:,} train / {counts[True]:,} val tokens ({meta['dtype']})"
        + (f"; {stats.replaced} invalid UTF-8 bytes replaced by U+FFFD" if stats.replaced else ""))
    return meta


@contextlib.contextmanager
def writing_prepared(folder: str, tmp: dict):
    """The block that writes prepared data: a write that fails (a full disk) is a one-line
    UserError, and the .tmp files are gone afterwards whatever happened (published ones were
    renamed already)."""
    try:
        yield
    except OSError as err:
        raise UserError(_write_failure(folder, err)) from None
    finally:
        for path in tmp.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _publish(folder: str, tmp: dict, paths: dict, tokenizer: Tokenizer, meta: dict) -> None:
    """Put the finished token files in place, meta.json last. The old meta.json goes first, so
    at every moment the folder holds the old prepared data, or no meta.json (not prepared: it
    will be prepared again), or the new prepared data; never new files under an old meta.json."""
    meta_path = os.path.join(folder, "meta.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(meta_path)
    for k in paths:
        os.replace(tmp[k], paths[k])
    tokenizer.save(os.path.join(folder, "tokenizer.model"))  # sources that need word or sentence facts read it
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))


SPLITS = ("train", "val")


def inspect_prepared(folder: str) -> tuple[dict | None, str | None]:
    """(meta, None) for sound prepared data in `folder`, (None, None) when there is none (no
    meta.json), (None, why) when it is damaged: meta.json unreadable, not a JSON object, without
    a token dtype, or a token file missing or of another size than meta.json's token count.
    A hand-made meta.json without the counts only needs whole tokens in each file."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        return None, None
    try:
        with open(meta_path, "rb") as f:
            meta = json.loads(f.read())
    except OSError as err:
        return None, f"cannot read {display(meta_path)}: {_reason(err)}"
    except (ValueError, RecursionError):
        return None, f"{display(meta_path)} is not valid JSON (empty or cut short)"
    if not isinstance(meta, dict):
        return None, f"{display(meta_path)} holds no JSON object"
    name = meta.get("dtype")
    try:
        dtype = np.dtype(name) if isinstance(name, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in "ui":
        return None, f"{display(meta_path)} names no integer token dtype (dtype: {name!r})"
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.bin")
        try:
            size = os.path.getsize(path)
        except OSError:
            return None, f"{display(path)} is missing"
        n = meta.get(f"{split}_tokens")
        if n is None:
            if size % dtype.itemsize:
                return None, f"{display(path)} has {size:,} bytes, not a whole number of {dtype.name} tokens"
        elif not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return None, f"{display(meta_path)} has {split}_tokens = {n!r}, not a count"
        elif size != n * dtype.itemsize:
            return None, (f"{display(path)} has {size:,} bytes but meta.json says {n:,} tokens "
                          f"({n * dtype.itemsize:,} bytes)")
    if meta.get("kind") == "rows":
        damage = check_rows(folder, meta)
        if damage is not None:
            return None, damage
    return meta, None


def check_rows(folder: str, meta: dict) -> str | None:
    """Why the row index files of prepared row data (rows.py) are damaged, or None when they are
    sound. Here, beside inspect_prepared, so that rows.py builds on this module and not the reverse."""
    n_columns = len(meta.get("columns") or [])
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.rows.npy")
        try:
            rows = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            return f"{display(path)} is missing or unreadable ({err.__class__.__name__})"
        if rows.ndim != 3 or rows.shape[1:] != (n_columns, 2) or rows.shape[0] != meta.get(f"{split}_rows"):
            return f"{display(path)} has shape {rows.shape}, not ({meta.get(f'{split}_rows')}, {n_columns}, 2)"
        if len(rows) and int((rows[..., 0] + rows[..., 1]).max()) > meta.get(f"{split}_tokens", 0):
            return f"{display(path)} points past the end of {split}.bin"
        if meta.get("label_column"):
            path = os.path.join(folder, f"{split}.labels.npy")
            try:
                labels = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                return f"{display(path)} is missing or unreadable ({err.__class__.__name__})"
            if labels.shape != (rows.shape[0],):
                return f"{display(path)} has {labels.shape} labels for {rows.shape[0]} rows"
    return None


def load_meta(folder: str) -> dict | None:
    """folder/meta.json checked against the token files (inspect_prepared); None when the folder
    holds no prepared data. Damaged prepared data is a UserError, never a traceback later."""
    meta, damage = inspect_prepared(folder)
    if damage is not None:
        raise UserError(f"the prepared data in {display(folder)} is damaged: {damage}; prepare it again "
                        "(train.py --data ... prepares it again in its --out_dir)")
    return meta




def tokenizer_of(folder: str, meta: dict) -> Tokenizer:
    """The tokenizer that prepared `folder`: folder/tokenizer.model (prepare writes it), else, for
    a folder prepared before it did, train.py's out_dir/tokenizer.model next to out_dir/data."""
    for path in (os.path.join(folder, "tokenizer.model"),
                 os.path.join(os.path.dirname(os.path.abspath(folder)), "tokenizer.model")):
        if os.path.exists(path):
            tokenizer = Tokenizer.load(path)
            if tokenizer_fingerprint(tokenizer) == meta.get("tokenizer"):
                return tokenizer
    raise UserError(f"cannot find the tokenizer that prepared {folder}; prepare the data again "
                    "(run train.py with a fresh --out_dir)")


