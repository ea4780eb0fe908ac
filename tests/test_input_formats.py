"""What --data can be and how preparing it behaves when things go wrong: CSV/TSV/JSON/compressed
files, entries that are not regular files, odd bytes, corpora without newlines, an --out_dir inside
the data folder, Ctrl-C and SIGTERM while tokenizing, a full disk, damaged prepared folders, and
progress lines. Small synthetic corpora; the session tokenizer from conftest.py where one is needed."""
from __future__ import annotations

import contextlib
import bz2
import errno
import gzip
import json
import lzma
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import minilm.data.preparation as data  # the module that tokenizes and writes
import minilm.data.reading as reading  # the module that opens and reads the source
from minilm.config import parse_overrides
from minilm.data import (CHUNK_CHARS, READ_BYTES, BlockSource, iter_texts, load_meta, prepare, resolve_files,
                         tokenizer_texts)
from minilm.errors import UserError
from minilm.tokenizer import EOS_ID, MAX_LINE_CHARS, Tokenizer, _lines_of
from tests.conftest import ROOT, load_script

QUIET = dict(log=lambda *_: None)


def read_split(folder, split: str) -> np.ndarray:
    with open(os.path.join(folder, "meta.json")) as f:
        dtype = json.load(f)["dtype"]
    return np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=dtype)


def documents(tokenizer, folder) -> list[str]:
    """Every document of a prepared folder, decoded, train then val."""
    docs = []
    for split in ("train", "val"):
        tokens = read_split(folder, split)
        ends = np.flatnonzero(tokens == EOS_ID)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(int)
        docs += [tokenizer.decode(tokens[a:b]) for a, b in zip(starts, ends)]
    return docs


def prep(source, tokenizer, tmp_path, name="out", **kw):
    folder = str(tmp_path / name)
    kw.setdefault("num_workers", 1)
    kw.setdefault("log", lambda *_: None)
    return folder, prepare(str(source), tokenizer, folder, **kw)


@pytest.fixture(scope="module")
def train_script():
    """train.py as a module, to call tokenizer_and_data in-process (fast; no subprocess)."""
    return load_script("train.py")


def config(data_path, out_dir, *flags):
    return parse_overrides(["--data", str(data_path), "--out_dir", str(out_dir), "--vocab_size", "512",
                            "--num_workers", "1", *map(str, flags)])


def small_folder(tmp_path, texts, n=8, name="corpus"):
    folder = tmp_path / name
    folder.mkdir()
    for i, doc in enumerate(texts[:n]):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- formats
ROWS = [{"id": 1, "text": "First row, with a comma.", "label": "a"},
        {"id": 2, "text": 'A "quoted" cell\nthat spans two lines.', "label": "b"},
        {"id": 3, "text": "", "label": "blank rows are skipped"},
        {"id": 4, "text": "Tab\tinside and ünïcode 😀.", "label": "c"}]
ROW_TEXTS = [r["text"] for r in ROWS if r["text"]]


def _csv_bytes(delimiter: str) -> bytes:
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter)
    writer.writerow(["id", " text", "label"])  # a space after the delimiter is forgiven in the header
    for r in ROWS:
        writer.writerow([r["id"], r["text"], r["label"]])
    return "\ufeff".encode() + buffer.getvalue().encode("utf-8")  # with the BOM spreadsheets write


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_give_one_document_per_row_from_the_text_column(tokenizer, tmp_path, suffix, delimiter):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(_csv_bytes(delimiter))
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.3)
    assert sorted(documents(tokenizer, folder)) == sorted(ROW_TEXTS)  # no header, no ids, no commas
    assert meta["train_documents"] + meta["val_documents"] == 3


def test_csv_without_the_column_names_the_columns(tokenizer, tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(_csv_bytes(","))
    with pytest.raises(UserError, match=r"train.csv has no column 'body' \(its columns: id, text, label\); "
                                        r"pass --text_field"):
        prep(path, tokenizer, tmp_path, text_field="body")
    folder, _ = prep(path, tokenizer, tmp_path, text_field="label")
    assert sorted(documents(tokenizer, folder)) == ["a", "b", "blank rows are skipped", "c"]


def test_json_file_of_json_lines_reads_the_text_field(tokenizer, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("".join(json.dumps({"title": f"t{i}", "body": f"Body number {i}."}) + "\n" for i in range(4)))
    folder, _ = prep(path, tokenizer, tmp_path, text_field="body", val_fraction=0.25)
    assert sorted(documents(tokenizer, folder)) == [f"Body number {i}." for i in range(4)]


def test_json_file_with_an_array_of_objects(tokenizer, tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"text": f"Document {i}, from an array."} for i in range(4)], indent=2))
    folder, _ = prep(path, tokenizer, tmp_path, val_fraction=0.25)
    assert sorted(documents(tokenizer, folder)) == [f"Document {i}, from an array." for i in range(4)]
    path.write_text(json.dumps([{"text": "fine"}, {"other": "no text"}]))
    with pytest.raises(UserError, match=r"x.json: element 1 of the array: no 'text' field"):
        prep(path, tokenizer, tmp_path, name="out2")


COMPRESSED = {"x.txt.gz": gzip.compress, "x.jsonl.gz": gzip.compress, "x.csv.gz": gzip.compress,
              "x.txt.bz2": bz2.compress, "x.jsonl.xz": lzma.compress}


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_files_are_read_in_the_format_their_name_gives(tokenizer, tmp_path, name):
    docs = [f"Compressed document {i}, with commas." for i in range(4)]
    if ".jsonl" in name:
        raw = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    elif ".csv" in name:
        raw = "text\n" + "".join(f'"{d}"\n' for d in docs)
    else:
        raw = "\n<|endoftext|>\n".join(docs)
    (tmp_path / name).write_bytes(COMPRESSED[name](raw.encode()))
    folder, meta = prep(tmp_path / name, tokenizer, tmp_path, val_fraction=0.25)
    got = sorted(d.rstrip("\n") for d in documents(tokenizer, folder))
    assert got == sorted(docs), got
    assert meta["replaced_invalid_utf8"] == 0


def test_unreadable_compression_and_cut_gzip_are_one_line(tokenizer, tmp_path):
    (tmp_path / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 20)
    with pytest.raises(UserError, match=r"x.jsonl.zst is zstd-compressed, which minilm cannot read"):
        prep(tmp_path / "x.jsonl.zst", tokenizer, tmp_path)
    whole = gzip.compress(("A line of text that goes on. " * 4000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UserError, match=r"cannot read .*cut.txt.gz: Compressed file ended"):
        prep(tmp_path / "cut.txt.gz", tokenizer, tmp_path)
    assert not os.path.exists(tmp_path / "out" / "train.bin.tmp")


def test_text_field_matters_for_every_structured_format(train_script):
    cfg = parse_overrides(["--text_field", "body"])
    for files in (["a.csv"], ["a.tsv"], ["b.txt", "a.json"], ["a.jsonl.gz"], ["a.ndjson"]):
        assert train_script.prepare_settings(cfg, files)["text_field"] == "body", files
    assert "text_field" not in train_script.prepare_settings(cfg, ["a.txt", "b.md", "c.txt.gz"])


# ----------------------------------------------------------------------------- odd entries and bytes
def _in_thread(fn, timeout=20):
    """fn() in a daemon thread: (finished, result or exception). A hang fails the test instead of
    hanging the whole run."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["result"] = err
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("result")


def test_fifo_in_the_data_folder_is_skipped_and_named(tokenizer, tmp_path, texts):
    folder = small_folder(tmp_path, texts, n=4)
    os.mkfifo(folder / "pipe.txt")
    lines = []
    try:
        finished, result = _in_thread(lambda: prep(folder, tokenizer, tmp_path, log=lines.append))
    finally:  # a reader stuck on the FIFO (the bug) is released by a writer that comes and goes
        try:
            os.close(os.open(folder / "pipe.txt", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert finished, "opening the FIFO hung"
    assert not isinstance(result, BaseException), result
    assert result[1]["files"] == 4
    assert lines[0] == f"skipped 1 entry of --data that is not a regular file: {folder / 'pipe.txt'} (a FIFO)"


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_fifo_or_device_given_as_data_says_what_it_is(tmp_path, kind):
    path = "/dev/zero" if kind == "device" else str(tmp_path / "pipe")
    if kind == "fifo":
        os.mkfifo(path)
    what = "a character device" if kind == "device" else "a FIFO"
    with pytest.raises(UserError, match=rf"--data {path} is not a regular file \({what}\)"):
        resolve_files(path)


def test_dangling_symlink_and_symlink_loop_are_skipped(tokenizer, tmp_path, texts):
    folder = small_folder(tmp_path, texts, n=3)
    os.symlink(folder / "gone.txt", folder / "dangling.txt")
    os.symlink(folder / "loop_b", folder / "loop_a")
    os.symlink(folder / "loop_a", folder / "loop_b")
    os.symlink(folder / "doc0.txt", folder / "link_to_doc0.txt")  # a link to a file is read
    lines = []
    assert len(resolve_files(str(folder), log=lines.append)) == 4
    assert lines == [f"skipped 3 entries of --data that are not a regular file: {folder / 'dangling.txt'} "
                     f"(a dangling symlink), {folder / 'loop_a'} (a symlink loop), {folder / 'loop_b'} "
                     "(a symlink loop)"]
    with pytest.raises(UserError, match="dangling.txt is not a regular file \\(a dangling symlink\\)"):
        resolve_files(str(folder / "dangling.txt"))


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 does not stop a read: the open itself is made to fail."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("readable text\n")
    (folder / "locked.txt").write_text("no access\n")
    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith("locked.txt"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(reading, "open", refusing_open, raising=False)
    with pytest.raises(UserError, match=r"cannot read .*locked.txt: Permission denied$"):
        resolve_files(str(folder))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_by_mode_is_one_line(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("no access\n")
    path.chmod(0)
    with pytest.raises(UserError, match="cannot read .*locked.txt: Permission denied"):
        resolve_files(str(path))


def test_file_name_that_is_not_utf8_is_read_and_printed(tokenizer, tmp_path, texts, train_script):
    folder = small_folder(tmp_path, texts, n=3)
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.txt")
    with open(odd, "wb") as f:
        f.write(b"A file whose name is Latin-1.\n")
    os.mkfifo(os.path.join(os.fsencode(folder), b"pipe\xff"))
    lines = []
    strict = lambda line: lines.append(line.encode("utf-8").decode())  # noqa: E731 - prints like a UTF-8 stdout
    files = resolve_files(str(folder), log=strict)
    assert len(files) == 4
    assert lines == [f"skipped 1 entry of --data that is not a regular file: {folder}/pipe\\xff (a FIFO)"]
    assert len(train_script.data_signature(str(folder), files)) == 16
    _, meta = prep(folder, tokenizer, tmp_path, log=strict, files=files)
    assert meta["files"] == 4
    bad = os.path.join(os.fsencode(folder), b"rows\xe9.jsonl")
    with open(bad, "wb") as f:
        f.write(b'{"text": oops}\n')
    with pytest.raises(UserError) as err:
        prep(os.fsdecode(bad), tokenizer, tmp_path, name="out2")
    message = str(err.value).encode("utf-8").decode()   # printable as it is
    assert message.startswith(f"{folder}/rows\\xe9.jsonl:1: this line is not valid JSON")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt.gz"])
def test_a_byte_order_mark_is_dropped(tokenizer, tmp_path, suffix):
    path = tmp_path / f"bom{suffix}"
    if suffix == ".jsonl":
        path.write_bytes("\ufeff".encode() + b'{"text": "First."}\n{"text": "Second."}\n')
    else:
        path.write_bytes(gzip.compress("\ufeff".encode() + b"First.\n<|endoftext|>\nSecond.\n"))
    folder, _ = prep(path, tokenizer, tmp_path, val_fraction=0.5)
    assert sorted(d.strip() for d in documents(tokenizer, folder)) == ["First.", "Second."]


def test_deeply_nested_json_is_one_line_naming_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(UserError, match=r"deep.jsonl:2: this JSON nests too deeply to read$"):
        prep(path, tokenizer, tmp_path)


def test_lone_surrogate_in_json_is_replaced_and_counted(tokenizer, tmp_path):
    path = tmp_path / "s.jsonl"
    # a lone high surrogate, a lone low one, and a proper pair (an emoji) that stays
    path.write_text('{"text": "bad \\ud800 and \\udfff end"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.5)
    assert sorted(documents(tokenizer, folder)) == ["bad \ufffd and \ufffd end", "pair 😀 ok"]
    assert meta["replaced_invalid_utf8"] == 2


# ----------------------------------------------------------------------------- lines without end
WORDS = np.array(["the", "data", "naïve", "café", "日本語", "😀", "model", "reads", "a", "line", "that",
                  "never", "ends", "Ünïcödé", "token"])


def one_line_corpus(path, n_words: int, seed: int = 0) -> str:
    """A single line of random words (with multi-byte characters, so reads cut through them)."""
    rng = np.random.default_rng(seed)
    text = " ".join(WORDS[rng.integers(0, len(WORDS), n_words)]) + "."
    path.write_text(text, encoding="utf-8")
    return text


def test_lines_of_cuts_long_lines_before_a_space_run():
    line = "ab  cd efg " * 1000 + "x" * 10_000 + " tail"
    parts = list(_lines_of(["short line\n" + line], max_chars=40))
    assert parts[0] == "short line"
    assert "".join(parts[1:]) == line
    assert max(map(len, parts)) == 40
    for a, b in zip(parts[1:], parts[2:]):  # each cut falls before a run of spaces, unless `a` has none
        assert (b.startswith(" ") and not a.endswith(" ")) or " " not in a[1:], (a, b)
    assert parts[-2] == "x" * 40 and parts[-1].endswith("x tail")  # a word longer than 40 is cut anywhere


def test_tokenizer_trains_on_a_corpus_without_newlines(tmp_path):
    path = tmp_path / "one_line.txt"
    one_line_corpus(path, 400_000)   # about 2.6 MB, no newline at all
    assert os.path.getsize(path) > 2_000_000
    tokenizer = Tokenizer.train(iter_texts(str(path)), vocab_size=420, sample_lines=200)
    assert tokenizer.vocab_size == 420
    assert tokenizer.decode(tokenizer.encode("the naïve café")) == "the naïve café"
    assert all(len(line) <= MAX_LINE_CHARS for line in _lines_of(iter_texts(str(path))))


def test_a_single_line_corpus_is_read_and_encoded_in_bounded_pieces(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "one_line.txt"
    text = one_line_corpus(path, 150_000)
    reads, pieces = [], []
    real_open, real_encode = open, data._encode_job

    class RecordingFile:
        """The corpus file, recording how much each read returns."""

        def __init__(self, f):
            self.f = f

        def readline(self, size=-1):
            reads.append(len(line := self.f.readline(size)))
            return line

        def read(self, size=-1):
            reads.append(len(chunk := self.f.read(size)))
            return chunk

        def __iter__(self):
            return iter(self.readline, b"")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def recording_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return RecordingFile(f) if str(file) == str(path) and mode == "rb" else f

    def recording_encode(job):
        pieces.extend(len(piece) for piece, _, _ in job)
        return real_encode(job)
    monkeypatch.setattr(reading, "open", recording_open, raising=False)
    monkeypatch.setattr(data, "_encode_job", recording_encode)
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.1)
    assert max(reads) <= READ_BYTES
    assert max(pieces) <= CHUNK_CHARS + 2 * READ_BYTES and len(pieces) > 10
    assert meta["replaced_invalid_utf8"] == 0  # reads cut inside multi-byte characters are joined back
    train, val = read_split(folder, "train"), read_split(folder, "val")
    train_text, val_text = tokenizer.decode(train[:-1]), tokenizer.decode(val[:-1])
    assert train_text + val_text == text        # nothing lost, nothing added where pieces were cut
    assert 0.05 < len(val_text) / len(text) < 0.2 and val_text.startswith(" ")  # cut before a space
    # a cut before a space changes no token: the pieces encode like the whole text
    head = text[:200_000]
    assert sum(len(tokenizer.encode(p)) for p in _cut_like_the_reader(head)) == len(tokenizer.encode(head))


def _cut_like_the_reader(text: str, size: int = 5000) -> list[str]:
    parts, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        cut = text.rfind(" ", start + 1, end) if end < len(text) else end
        cut = len(text[:cut].rstrip(" ")) if cut > start else end
        parts.append(text[start:cut])
        start = cut
    return parts


# ----------------------------------------------------------------------------- out_dir inside the data
def test_out_dir_inside_the_data_folder_is_not_read_as_data(tmp_path, texts, train_script):
    folder = small_folder(tmp_path, texts, n=10)
    out = folder / "run"
    lines = []
    train_script.tokenizer_and_data(config(folder, out), log=lines.append)
    assert load_meta(out / "data")["files"] == 10
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # what a run writes later is not data either
    lines = []
    train_script.tokenizer_and_data(config(folder, out), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("reusing"), lines
    assert len(resolve_files(str(folder / "**" / "*.*"), exclude=str(out))) == 10  # a glob, too


# ----------------------------------------------------------------------------- signals
SLOW_TRAIN = """
import importlib.util, signal, sys, time
# as started from a terminal, whatever the test runner's own signal state: an ignored or blocked
# SIGINT is inherited through fork and exec, and Python installs no KeyboardInterrupt then
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
import minilm.data.preparation as data
from minilm.cli import run_cli

real_encode = data._encode_job
def slow_encode(job):  # a worker that would take long: stopping must not wait for it
    time.sleep(60)
    return real_encode(job)
data._encode_job = slow_encode
spec = importlib.util.spec_from_file_location("train_script", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
sys.argv = sys.argv[1:]
run_cli(train.main)
"""


@pytest.mark.parametrize("signum,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)])
def test_signal_while_tokenizing_is_one_line_and_leaves_nothing(tmp_path, texts, signum, to_group):
    """Ctrl-C reaches the whole process group (workers included); `kill` only the main process."""
    folder = small_folder(tmp_path, texts, n=30)
    out = tmp_path / "out"
    args = ["--data", folder, "--out_dir", out, "--num_workers", 2, "--max_steps", 0, "--vocab_size", 512,
            "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, os.path.join(ROOT, "train.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not lines.get(timeout=max(0.1, deadline - time.monotonic())).startswith("tokenizing"):
            pass
        time.sleep(1.0)  # the workers are busy with their first jobs
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        sent = time.monotonic()
        parent_state = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 30 s after signal {int(signum)}; the test runner's SIGINT handler and "
                                 f"blocked signals: {parent_state}") from None
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.stderr.read()
    assert code == 128 + signum, stderr
    assert stderr.splitlines() == [f"stopped by signal {int(signum)} while preparing data; nothing was saved"]
    assert took < 5, took  # the pool is terminated, its 60-second jobs not waited for
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == [] and not (out / "data" / "meta.json").exists()
    assert not (out / "tokenizer.model").exists()


def test_a_worker_that_dies_is_one_line_not_a_hang(tokenizer, tmp_path, texts, monkeypatch):
    """A worker killed from outside (the out-of-memory killer, say): multiprocessing.Pool waited
    for its job forever."""
    folder = small_folder(tmp_path, texts, n=30)
    monkeypatch.setattr(data, "_encode_job", lambda job: os._exit(3))  # forked workers see it
    finished, result = _in_thread(lambda: prep(folder, tokenizer, tmp_path, num_workers=2))
    assert finished, "tokenizing hung"
    assert isinstance(result, UserError), result
    assert str(result) == ("a tokenizing worker process ended unexpectedly (exit code 3, out of memory?); "
                           "try a smaller --num_workers")
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]


# ----------------------------------------------------------------------------- a full disk
def test_full_disk_while_writing_tokens_is_one_line_and_leaves_no_tmp(tokenizer, tmp_path, texts, monkeypatch):
    folder = small_folder(tmp_path, texts, n=6)
    real_open = open

    class FullDiskFile:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDiskFile(f) if "w" in mode and str(file).endswith(".tmp") else f
    monkeypatch.setattr(data, "open", full_disk_open, raising=False)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"^no space left to prepare the data in {out} \([0-9,]+ MB free, "
                                        r"No space left on device\); free some space or pass an --out_dir"):
        prep(folder, tokenizer, tmp_path)
    assert sorted(os.listdir(out)) == []


def test_full_disk_while_writing_meta_is_one_line(tokenizer, tmp_path, texts, monkeypatch):
    folder = small_folder(tmp_path, texts, n=6)

    def full(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(data, "atomic_write_bytes", full, raising=False)
    with pytest.raises(UserError, match="no space left to prepare the data in"):
        prep(folder, tokenizer, tmp_path)
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n or n == "meta.json"]


# ----------------------------------------------------------------------------- damaged prepared data
DAMAGE = {
    "empty_meta": (lambda f: (f / "meta.json").write_text(""), "meta.json is not valid JSON"),
    "meta_not_object": (lambda f: (f / "meta.json").write_text("[1, 2]"), "meta.json holds no JSON object"),
    "truncated_train": (lambda f: os.truncate(f / "train.bin", 123),
                        "train.bin has 123 bytes but meta.json says"),
    "missing_val": (lambda f: os.remove(f / "val.bin"), "val.bin is missing"),
    "bad_count": (lambda f: (f / "meta.json").write_text(json.dumps(
        {**json.loads((f / "meta.json").read_text()), "val_tokens": "many"})), "val_tokens = 'many', not a count"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_sources_refuse_a_damaged_prepared_folder_in_one_line(prepared, tmp_path, damage):
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(prepared[0], folder)
    BlockSource(str(folder), "train", seq_len=8, batch_size=2)
    make, fragment = DAMAGE[damage]
    make(folder)
    with pytest.raises(UserError) as err:
        BlockSource(str(folder), "train", seq_len=8, batch_size=2)
    assert str(err.value).startswith(f"the prepared data in {folder} is damaged: ")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_damaged_prepared_folder_is_prepared_again(tmp_path, texts, train_script):
    folder = small_folder(tmp_path, texts, n=6)
    out = tmp_path / "out"
    train_script.tokenizer_and_data(config(folder, out), log=lambda *_: None)
    meta = load_meta(out / "data")
    os.truncate(out / "data" / "train.bin", 124)
    lines = []
    train_script.tokenizer_and_data(config(folder, out), log=lines.append)
    assert lines[0] == (f"preparing again: {out}/data/train.bin has 124 bytes but meta.json says "
                        f"{meta['train_tokens']:,} tokens ({2 * meta['train_tokens']:,} bytes)")
    assert load_meta(out / "data") == meta
    (out / "data" / "meta.json").write_text("")
    lines = []
    train_script.tokenizer_and_data(config(folder, out), log=lines.append)
    assert lines[0] == f"preparing again: {out}/data/meta.json is not valid JSON (empty or cut short)"
    lines = []
    train_script.tokenizer_and_data(config(folder, out), log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("reusing"), lines


def test_meta_json_is_written_once_atomically_with_its_provenance(tmp_path, texts, train_script, monkeypatch):
    folder = small_folder(tmp_path, texts, n=6)
    out = tmp_path / "out"
    writes = []
    real_write = data.atomic_write_bytes if hasattr(data, "atomic_write_bytes") else None

    def recording_write(path, payload):
        writes.append((os.path.basename(path), json.loads(payload)))
        real_write(path, payload)
    monkeypatch.setattr(data, "atomic_write_bytes", recording_write, raising=False)
    train_script.tokenizer_and_data(config(folder, out), log=lambda *_: None)
    assert [name for name, _ in writes] == ["meta.json"]
    assert writes[0][1] == load_meta(out / "data")
    assert {"signature", "settings", "train_tokens"} <= set(writes[0][1])


# ----------------------------------------------------------------------------- progress
def test_progress_lines_give_share_speed_and_time_left(tokenizer, tmp_path, texts):
    folder = small_folder(tmp_path, texts, n=30)
    lines = []
    _, meta = prep(folder, tokenizer, tmp_path, log=lines.append, progress_every=0)
    counting = [ln for ln in lines if ln.startswith("counting documents: ")]
    tokenizing = [ln for ln in lines if ln.startswith("tokenizing: ")]
    assert len(counting) == 30
    assert counting[-1].startswith(f"counting documents: {meta['chars'] / 1e6:,.1f} M characters, ")
    assert len(tokenizing) >= 1 and "M/s, ETA " in tokenizing[0]
    assert tokenizing[-1].startswith(f"tokenizing: {meta['chars'] / 1e6:,.1f} of {meta['chars'] / 1e6:,.1f} "
                                     "M characters (100%), ")
    assert lines.index(tokenizing[0]) > lines.index(
        f"tokenizing {meta['chars']:,} characters in 30 documents with 1 worker")


def test_a_small_corpus_prints_no_progress_lines(tokenizer, tmp_path, texts, train_script):
    folder = small_folder(tmp_path, texts, n=6)
    lines = []
    _, meta = prep(folder, tokenizer, tmp_path, log=lines.append)
    assert lines == [f"tokenizing {meta['chars']:,} characters in 6 documents with 1 worker", lines[1]]
    assert lines[1].startswith(f"prepared {folder}: 6 documents")
    lines = []
    train_script.tokenizer_and_data(config(folder, tmp_path / "run"), log=lines.append)
    assert [ln.split(" ")[0] for ln in lines] == ["training", "tokenizing", "prepared"], lines


def test_tokenizer_reading_says_when_sentencepiece_starts(tmp_path, texts):
    folder = small_folder(tmp_path, texts, n=5)
    lines = []
    got = list(tokenizer_texts(str(folder), log=lines.append, progress_every=0))
    assert got == texts[:5]
    chars = sum(map(len, texts[:5]))
    assert [ln.split(":")[0] for ln in lines] == ["reading text for the tokenizer"] * 5 + [lines[-1].split(":")[0]]
    assert lines[4].startswith(f"reading text for the tokenizer: {chars / 1e6:,.1f} M characters, ")
    assert lines[-1].startswith(f"read {chars / 1e6:,.1f} M characters in 0m00s; sentencepiece is training")
    lines = []
    assert list(tokenizer_texts(str(folder), log=lines.append)) == texts[:5] and lines == []


def test_a_ctrl_c_while_the_workers_start_kills_the_ones_started(tokenizer, monkeypatch):
    """Signals are held back while the workers fork and arrive as they are unblocked, inside the
    pool's constructor, before any caller holds the pool to kill it: the constructor kills them,
    or the interpreter's exit would wait on workers that may not yet ignore the signal."""
    import multiprocessing

    @contextlib.contextmanager
    def interrupted_on_unblock():
        yield
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_signals_blocked", interrupted_on_unblock)
    with pytest.raises(KeyboardInterrupt):
        data._EncoderPool(tokenizer.model_bytes, 2)
    assert multiprocessing.active_children() == []
