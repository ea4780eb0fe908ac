"""From text on disk to random training windows.

    prepare(source, tokenizer, folder)  ->  folder/train.bin, folder/val.bin, folder/meta.json,
                                            folder/tokenizer.model (the tokenizer that made them)
    BlockSource(folder, "train", ...)   ->  .batch(step) = LongTensor (batch_size, seq_len + 1)
                                            (or the objective's window_length: t5 reads more)
    SegmentPairSource(folder, "train", ...)  ->  .batch(step) = {"input_ids": [CLS] A [SEP] B [SEP], ...}

What counts as a document depends on the file name (file_format):
  * .jsonl (or .ndjson): JSON Lines, one document per row, its text in the field `text_field`;
  * .json: JSON Lines as well, or one JSON array of objects when the file starts with `[` (an
    array is one JSON value, so it is parsed whole: give big corpora as JSON Lines);
  * .csv / .tsv: a header row, then one document per row, its text in the column `text_field`;
  * any other file is text: one document, unless it contains lines that are exactly
    `<|endoftext|>`, which separate documents inside the file (the convention of GPT-2 dumps);
  * gzip, bzip2 and xz data (told by its first bytes) is decompressed as it is read; the name
    without its .gz / .bz2 / .xz suffix gives the format (x.jsonl.gz is JSON Lines);
  * a folder: every non-hidden regular file below it, in sorted order; a glob: every regular
    file it matches. FIFOs, sockets, devices, dangling symlinks and symlinks to folders are
    skipped and named in one log line (opening a FIFO would wait forever); so are the files
    under `exclude` (train.py's --out_dir, when it lies inside the data folder).
After each document comes the end-of-document token <eos> (id 3), so a model learns where texts end.
A UTF-8 byte order mark at the start of a file is dropped.

The validation split is by document (max(1, round(val_fraction * n_docs)) documents, evenly
spaced), so no document has text on both sides. A corpus that is a single document is cut at a
line boundary instead (or before a space, inside a very long line): its last val_fraction goes
to validation.

Streaming: text files are read at most READ_BYTES at a time; a longer line is cut just before a
run of spaces, where sentencepiece starts a new piece anyway (anywhere, if it has no space), so
a corpus that is one 50 MB line costs no more memory than any other (a JSON Lines or CSV row is
one value, read whole; so is a .json array). The text goes to worker
processes in chunks of about 1 MB, which encode them while the main process appends the ids to
the memmaps, so neither the text nor the tokens ever need to fit in memory. Bytes that are not
valid UTF-8 (and lone surrogates like "\\ud800" in JSON strings, which are no characters) are
replaced by U+FFFD and counted in the summary, never dropped silently.

Preparing is all or nothing: the token files are written as .tmp files, renamed when complete,
and meta.json is written last, atomically; a failure, Ctrl-C or SIGTERM removes the .tmp files.
load_meta checks meta.json against the sizes of the token files, so damaged prepared data is a
one-line error (and train.py prepares it again), never a traceback or a silently short corpus.

Batches: a window of seq_len + 1 tokens (or the objective's window_length) starting at a
uniformly random offset; the offsets of a batch are a pure function of (seed, rank, step,
micro-step), so a resumed run reads exactly the windows an uninterrupted one would have read.
Segment pairs (for sentence-order prediction) are drawn the same way, from sentences found once,
with numpy, when the source is built.
"""
from __future__ import annotations

import ast
import bz2
import contextlib
import csv
import errno
import glob
import gzip
import hashlib
import itertools
import json
import lzma
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import shutil
import signal
import stat
import sysconfig
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from minilm.checkpoint import atomic_write_bytes
from minilm.errors import UserError
from minilm.tokenizer import CLS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer

DOC_SEPARATOR = "<|endoftext|>"
CHUNK_CHARS = 1 << 20
READ_BYTES = 1 << 16   # the most of a text file read at once: a longer line comes in parts
SLACK_CHARS = 1 << 16  # how far past chunk_chars a piece of a document may run to end at a line
MAX_INVALID_UTF8 = 0.01  # share of invalid UTF-8 bytes above which a corpus is refused
BUILTIN = "builtin"
BOM = "\ufeff"
PROGRESS_EVERY = 5.0   # seconds between the progress lines of a long pass

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")
# what a file's first bytes say: formats read as they are decompressed, and formats refused
DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"\xfd7zXZ\x00", lzma.open))
UNREADABLE_COMPRESSION = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"), (b"7z\xbc\xaf\x27\x1c", "7-Zip"))
# errors of reading a file: the OS, and a compressed stream that is cut short or corrupt
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
BEFORE_SPACE = re.compile(r"[^ ](?= )")  # the last character before a run of spaces
SEPARATOR_LINE = re.compile(r"^<\|endoftext\|>\r*(?:\n|\Z)", re.MULTILINE)  # a line that is just DOC_SEPARATOR


# ----------------------------------------------------------------------------- reading text
@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    replaced: int = 0      # bytes that were not valid UTF-8 (or lone surrogates), replaced by U+FFFD


def display(path) -> str:
    """A path as text any terminal can print. A file name that is not UTF-8 reaches Python with
    its bad bytes as lone surrogates, which print() refuses; they become \\xNN escapes here."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_format(path: str) -> str:
    """"text", "jsonl", "json", "csv" or "tsv", from the file name, a compression suffix looked through."""
    name = os.fsdecode(path).lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[:-len(suffix)]
            break
    return FORMATS.get(os.path.splitext(name)[1], "text")


def open_data_file(path: str):
    """A binary file over the text of `path`: gzip, bzip2 and xz data (told by the first bytes,
    whatever the name) is decompressed as it is read; zstd, zip and 7-Zip are refused."""
    f = open(path, "rb")
    with contextlib.ExitStack() as closing:  # closes f on every way out but the last line
        closing.callback(f.close)
        head = f.peek(10)[:10]
        # bzip2: "BZh", the block size digit, then the magic of a block or of the stream's end
        if head[:3] == b"BZh" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
            return bz2.open(path, "rb")
        for magic, opener in DECOMPRESSORS:
            if head.startswith(magic):
                return opener(path, "rb")
        for magic, name in UNREADABLE_COMPRESSION:
            if head.startswith(magic):
                raise UserError(f"{display(path)} is {name}-compressed, which minilm cannot read; decompress "
                                "it first (or compress it with gzip, bzip2 or xz, which are read as they are)")
        closing.pop_all()  # plain text: f itself is the file to read
    return f


def _why_not_regular(path: str) -> str | None:
    """None for a regular file (or a symlink to one); otherwise what it is, for a message."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if os.path.islink(path):
            return "a symlink loop" if err.errno == errno.ELOOP else "a dangling symlink"
        return f"unreadable: {err.strerror}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a symlink to a folder, not followed" if os.path.islink(path) else "a folder"
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _inside(path: str, folder: str | None) -> bool:
    if folder is None:
        return False
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(folder: str, exclude: str | None) -> tuple[list[str], list[str]]:
    """(regular files, "path (what it is)" for the entries skipped) below a folder, sorted;
    hidden entries and the `exclude` folder are left out without a word."""
    files, skipped = [], []
    for root, dirs, names in os.walk(folder, onerror=lambda err: skipped.append(
            f"{display(err.filename)} (cannot list it: {err.strerror})")):
        visible = sorted(d for d in dirs if not d.startswith("."))
        # os.walk lists a symlink to a folder but does not follow it (a loop would never end)
        skipped += [f"{display(os.path.join(root, d))} (a symlink to a folder, not followed)"
                    for d in visible if os.path.islink(os.path.join(root, d))]
        dirs[:] = [d for d in visible if not _inside(os.path.join(root, d), exclude)]
        for name in sorted(n for n in names if not n.startswith(".")):
            path = os.path.join(root, name)
            why = _why_not_regular(path)
            if why is None:
                files.append(path)
            else:
                skipped.append(f"{display(path)} ({why})")
    return files, skipped


def resolve_files(path: str, exclude: str | None = None, log=None) -> list[str]:
    """The regular files behind --data, never any under the folder `exclude` (a run's own
    out_dir); raises UserError when there is nothing to read. Entries that are not regular files
    are skipped, and `log` (when given) gets one line naming them."""
    if not path:
        raise UserError("--data is empty; give a text file, a folder, a glob or a .jsonl file")
    skipped: list[str] = []
    if os.path.isdir(path):
        files, skipped = _walk(path, exclude)
        if not files:
            where = (f" (files under {display(exclude)}, the --out_dir, are not data)"
                     if exclude and _inside(exclude, path) else "")
            raise UserError(f"the folder {display(path)} holds no files{where}; put .txt or .jsonl files in it")
    elif os.path.lexists(path):
        why = _why_not_regular(path)
        if why is not None:
            raise UserError(f"--data {display(path)} is not a regular file ({why}); "
                            "give a text file, a folder, a glob or a .jsonl file")
        files = [path]
    elif any(ch in path for ch in "*?["):
        files = []
        for match in sorted(glob.glob(path, recursive=True)):
            if _inside(match, exclude):
                continue
            why = _why_not_regular(match)
            if why is None:
                files.append(match)
            elif why != "a folder":  # a pattern like data/* matches folders too
                skipped.append(f"{display(match)} ({why})")
        if not files:
            raise UserError(f"the pattern {display(path)} matches no files")
    else:
        raise UserError(f"--data {display(path)} does not exist; give a text file, a folder, a glob or a .jsonl file")
    if skipped and log is not None:
        log(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} of --data that "
            f"{'is' if len(skipped) == 1 else 'are'} not a regular file: " + ", ".join(skipped[:5])
            + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
    for f in files:
        try:
            with open_data_file(f) as fh:
                head = fh.read(8192)
        except READ_ERRORS as err:
            raise UserError(f"cannot read {display(f)}: {_reason(err)}") from None
        if b"\x00" in head:
            raise UserError(f"{display(f)} looks binary (it contains NUL bytes); --data takes text files only")
    if all(os.path.getsize(f) == 0 for f in files):
        raise UserError(f"--data {display(path)} is empty: its files hold no text")
    return files


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _decode(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # one U+FFFD may stand for several bad bytes (a truncated sequence), so count bytes:
        # all bytes of the line minus those the valid text re-encodes to (3 per new U+FFFD)
        new_marks = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))
        stats.replaced += len(raw) - (len(text.encode("utf-8")) - 3 * new_marks)
        return text


def _split_utf8_tail(raw: bytes) -> tuple[bytes, bytes]:
    """`raw` cut before the UTF-8 character its last bytes begin but do not finish (a read that
    stopped inside it): (the complete part, the bytes to put before the next read)."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte < 0x80:
            return raw, b""
        if byte >= 0xC0:  # a lead byte: its character is 2, 3 or 4 bytes long
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return (raw[:-back], raw[-back:]) if length > back else (raw, b"")
    return raw, b""  # only continuation bytes: invalid either way, the decoder replaces them


def _last_space_run(text: str) -> int:
    """Where the last run of spaces in `text` starts (-1 without a space). Cutting a text there
    keeps every `▁word` piece whole: sentencepiece starts a piece at a space, never after it."""
    last = text.rfind(" ")
    return -1 if last < 0 else len(text[:last].rstrip(" "))


def _blocks_of_text_file(f, stats: ReadStats) -> Iterator[str]:
    """A text file's text in blocks of about READ_BYTES, each ending after a newline; a line
    longer than a block is cut just before a run of spaces (anywhere, if it has none). Bytes of
    a character that a read cut in two wait for the next read. A byte order mark is dropped."""
    carry, pending, first = "", b"", True
    while raw := f.read(READ_BYTES):
        raw, pending = _split_utf8_tail(pending + raw)
        text = carry + _decode(raw, stats)
        if first:
            text, first = text.removeprefix(BOM), False
        cut = text.rfind("\n") + 1                  # after the last whole line
        if cut == 0:                                # all of it is inside one long line
            cut = _last_space_run(text)
            cut = cut if cut > 0 else len(text)
        if cut:
            yield text[:cut]
        carry = text[cut:]
    rest = carry + _decode(pending, stats)
    if rest:
        yield rest


def _pieces_of_text_file(f, stats: ReadStats, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of a text file, cut like _cut_document cuts a document, so
    at most chunk_chars + SLACK_CHARS long. Documents end at the separator lines.

    A document that is only whitespace (e.g. blank lines after the last separator) is dropped,
    unless part of it was already handed out, which then still needs its end.
    """
    parts, size, has_text, started = [], 0, False, False  # started: a piece of it was yielded
    for block in _blocks_of_text_file(f, stats):
        sections = SEPARATOR_LINE.split(block) if DOC_SEPARATOR in block else [block]
        for i, section in enumerate(sections):
            if i:  # a separator line came before this section: the document ends there
                if has_text or started:
                    yield from _cut_document("".join(parts), chunk_chars)
                parts, size, has_text, started = [], 0, False, False
            if not section:
                continue
            parts.append(section)
            size += len(section)
            has_text = has_text or not section.isspace()
            if size >= chunk_chars + SLACK_CHARS:  # enough text to place the cuts _cut_document would
                *pieces, (rest, _) = _cut_document("".join(parts), chunk_chars)
                yield from ((piece, False) for piece, _ in pieces)
                started = started or bool(pieces)
                parts, size = [rest], len(rest)
    if has_text or started:
        yield from _cut_document("".join(parts), chunk_chars)


def _cut_document(text: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """One document as (text, ends_document) pieces of about chunk_chars, so a single-document
    corpus can be split for validation and no piece handed to the encoder is huge: each cut just
    after the first newline past chunk_chars, or if none comes within SLACK_CHARS, before the
    first space past it, or if there is none either, SLACK_CHARS further."""
    start = 0
    while len(text) - start > chunk_chars:
        limit = start + chunk_chars
        cut = text.find("\n", limit - 1, limit + SLACK_CHARS) + 1  # just after the newline
        if cut == 0:  # a long line: before the first run of spaces instead (where a ▁word starts)
            before_space = BEFORE_SPACE.search(text, limit - 1, limit + SLACK_CHARS)
            cut = before_space.end() if before_space else limit + SLACK_CHARS
        if cut >= len(text):
            break
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _text_of_row(row, field: str, where: str, stats: ReadStats) -> str:
    if not isinstance(row, dict) or field not in row:
        raise UserError(f"{where}: no {field!r} field in this row; pass --text_field NAME to read another field")
    text = row[field]
    if not isinstance(text, str):
        raise UserError(f"{where}: the {field!r} field is not a string")
    # JSON can spell a lone surrogate ("\ud800"), which is no character and no encoder takes
    text, lone = LONE_SURROGATE.subn("\ufffd", text)
    stats.replaced += lone
    return text


def _parse_json(line: str, where: str, hint: str = ""):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where}: this line is not valid JSON{hint}") from None
    except RecursionError:
        raise UserError(f"{where}: this JSON nests too deeply to read") from None


def _texts_of_json(f, path: str, field: str, stats: ReadStats, array_allowed: bool) -> Iterator[str]:
    """The texts of a JSON Lines file; with array_allowed (.json), also of a file holding one JSON
    array of objects, told by its first character."""
    hint = "; a .json file holds JSON Lines (one object per line) or one array of objects" if array_allowed else ""
    for lineno, raw in enumerate(f, 1):
        line = _decode(raw, stats)
        line = (line.removeprefix(BOM) if lineno == 1 else line).strip()
        if not line:
            continue
        if array_allowed and line.startswith("["):
            rows = _parse_json(line + _decode(f.read(), stats), f"{display(path)}:{lineno}", hint)
            if not isinstance(rows, list):
                raise UserError(f"{display(path)}: the file is not one JSON array{hint}")
            for i, row in enumerate(rows):
                yield _text_of_row(row, field, f"{display(path)}: element {i} of the array", stats)
            return
        yield _text_of_row(_parse_json(line, f"{display(path)}:{lineno}", hint), field,
                           f"{display(path)}:{lineno}", stats)


def _texts_of_csv(f, path: str, field: str, stats: ReadStats, delimiter: str) -> Iterator[str]:
    """The column `field` of each row of a CSV/TSV file with a header row."""
    lines = (_decode(raw, stats) for raw in f)   # with their line ends: csv needs them (quoted newlines)
    first = next(lines, None)
    if first is None:
        return
    reader = csv.reader(itertools.chain([first.removeprefix(BOM)], lines), delimiter=delimiter)
    # a text cell can be a whole article; csv's default limit (128 KB) would refuse it. The limit is
    # the csv module's, process-wide; raising it only lets more files parse.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    try:
        header = [name.strip() for name in next(reader, [])]
        if field not in header:
            names = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
            raise UserError(f"{display(path)} has no column {field!r} (its columns: {names}); "
                            "pass --text_field NAME to read another column")
        column = header.index(field)
        for row in reader:
            if column < len(row):
                yield row[column]
    except csv.Error as err:
        raise UserError(f"{display(path)}:{reader.line_num}: {err}") from None


def _pieces_of_file(path: str, f, field: str, stats: ReadStats, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    kind = file_format(path)
    if kind == "text":
        yield from _pieces_of_text_file(f, stats, chunk_chars)
        return
    texts = (_texts_of_csv(f, path, field, stats, "," if kind == "csv" else "\t") if kind in ("csv", "tsv")
             else _texts_of_json(f, path, field, stats, array_allowed=kind == "json"))
    for text in texts:
        if text.strip():
            yield from _cut_document(text, chunk_chars)


def builtin_documents() -> Iterator[str]:
    """A corpus that ships with every Python: pydoc's topic help and the stdlib's docstrings.

    About 2 MB of English prose. One document per pydoc topic and one per stdlib module (its
    module, class and function docstrings joined by blank lines). The modules are parsed with
    `ast`, never imported.
    """
    try:
        from pydoc_data.topics import topics
        for key in sorted(topics):
            yield topics[key]
    except ImportError:  # some distributions strip pydoc_data; docstrings alone still work
        pass
    stdlib = sysconfig.get_paths()["stdlib"]
    # tests are code, not prose; `encodings` is ~100 near-identical generated codec docstrings
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
            "__pycache__", "ensurepip", "venv", "encodings"}
    seen: set[int] = set()
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            docs = [ast.get_docstring(node) for node in ast.walk(tree)
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            text = "\n\n".join(d for d in docs if d and len(d) > 40)
            if text and hash(text) not in seen:  # modules that only re-export share docstrings
                seen.add(hash(text))
                yield text


class Progress:
    """A log line every `every` seconds while a long pass runs: characters done, speed, and with a
    known total, the share done and the time left. A pass shorter than `every` prints nothing."""

    def __init__(self, log, what: str, total: int | None = None, every: float = PROGRESS_EVERY):
        self.log, self.what, self.total, self.every = log, what, total, every
        self.start = self.last = time.monotonic()
        self.done = 0
        self.shown = False   # whether a line was printed

    def add(self, chars: int) -> None:
        self.done += chars
        now = time.monotonic()
        if self.log is not None and now - self.last >= self.every:
            self.last, self.shown = now, True
            self.log(self.line(now - self.start))

    def line(self, elapsed: float) -> str:
        rate = self.done / max(elapsed, 1e-6)
        text = f"{self.what}: {self.done / 1e6:,.1f}"
        if self.total:
            text += f" of {self.total / 1e6:,.1f} M characters ({self.done / self.total:.0%})"
        else:
            text += " M characters"
        text += f", {rate / 1e6:,.1f} M/s"
        if self.total and rate > 0:
            text += f", ETA {format_seconds((self.total - self.done) / rate)}"
        return text


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def iter_pieces(source: str, text_field: str = "text", stats: ReadStats | None = None,
                chunk_chars: int = CHUNK_CHARS, *, files: list[str] | None = None,
                progress: Progress | None = None) -> Iterator[tuple[str, bool]]:
    """Every (text, ends_document) piece of a source, in a fixed order. `files`: the source's
    files when already resolved (resolve_files), so a folder is not walked again."""
    stats = stats if stats is not None else ReadStats()
    if source == BUILTIN:
        for doc in builtin_documents():
            stats.documents += 1
            stats.chars += len(doc)
            if progress is not None:
                progress.add(len(doc))
            yield doc, True
        return
    for path in (files if files is not None else resolve_files(source)):
        stats.files += 1
        try:
            with open_data_file(path) as f:
                for text, ends in _pieces_of_file(path, f, text_field, stats, chunk_chars):
                    stats.chars += len(text)
                    stats.documents += ends
                    if progress is not None:
                        progress.add(len(text))
                    yield text, ends
        except READ_ERRORS as err:  # e.g. removed meanwhile, or a .gz file cut short
            raise UserError(f"cannot read {display(path)}: {_reason(err)}") from None
    if stats.replaced > max(16, MAX_INVALID_UTF8 * stats.chars):
        # a few bad bytes are replaced and counted; this many means another encoding
        raise UserError(f"--data {display(source)} is not UTF-8 text ({stats.replaced:,} invalid bytes in "
                        f"{stats.chars:,} characters); convert it first, e.g. iconv -f latin1 -t utf-8")


def iter_texts(source: str, text_field: str = "text", *, files: list[str] | None = None) -> Iterator[str]:
    """Just the text, e.g. to train a tokenizer on."""
    for text, _ in iter_pieces(source, text_field, files=files):
        yield text


def tokenizer_texts(source: str, text_field: str = "text", *, files: list[str] | None = None, log=print,
                    progress_every: float = PROGRESS_EVERY) -> Iterator[str]:
    """The texts for Tokenizer.train, with progress lines while they are read, then a line saying
    sentencepiece starts training (it prints nothing itself, for minutes on a big corpus). Both
    stay quiet for a corpus read in less than `progress_every` seconds (and under 10 M characters)."""
    progress = Progress(log, "reading text for the tokenizer", every=progress_every)
    for text, _ in iter_pieces(source, text_field, files=files, progress=progress):
        yield text
    if progress.shown or progress.done >= 10_000_000:
        log(f"read {progress.done / 1e6:,.1f} M characters in {format_seconds(time.monotonic() - progress.start)}; "
            "sentencepiece is training the tokenizer now")


# ----------------------------------------------------------------------------- prepare
_worker_tokenizer: Tokenizer | None = None


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
    _worker_tokenizer = Tokenizer(model_bytes)


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
    is_val_doc = lambda i: (i + 1) * n_val // count.documents > i * n_val // count.documents  # noqa: E731
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
    with _encoder(tokenizer, workers) as encode:
        try:
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
        except OSError as err:
            raise UserError(_write_failure(folder, err)) from None
        finally:
            for path in tmp.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    log(f"prepared {display(source)}: {stats.documents} documents, {stats.chars:,} characters -> "
        f"{counts[False]:,} train / {counts[True]:,} val tokens ({meta['dtype']})"
        + (f"; {stats.replaced} invalid UTF-8 bytes replaced by U+FFFD" if stats.replaced else ""))
    return meta


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
    return meta, None


def load_meta(folder: str) -> dict | None:
    """folder/meta.json checked against the token files (inspect_prepared); None when the folder
    holds no prepared data. Damaged prepared data is a UserError, never a traceback later."""
    meta, damage = inspect_prepared(folder)
    if damage is not None:
        raise UserError(f"the prepared data in {display(folder)} is damaged: {damage}; prepare it again "
                        "(train.py --data ... prepares it again in its --out_dir)")
    return meta


# ----------------------------------------------------------------------------- batches
def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style mixing): nearby inputs give
    unrelated streams, so step 5 of rank 0 and step 6 of rank 0 share nothing."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class BlockSource:
    """Random windows of window_length tokens from a token memmap ("blocks" data).

    window_length is what the objective reads (Objective.window_length): seq_len + 1 by default
    (a causal LM's shifted labels), more for t5, whose noise spans shrink into sentinels."""

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 window_length: int | None = None):
        meta = load_meta(folder)
        if meta is None:
            raise UserError(f"no prepared data in {folder}; run train.py with --data to prepare it")
        self.path = os.path.join(folder, f"{split}.bin")
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.window_length = seq_len + 1 if window_length is None else window_length
        self.split_id = 0 if split == "train" else 1
        dtype = np.dtype(meta["dtype"])
        n_tokens = os.path.getsize(self.path) // dtype.itemsize  # checked first: numpy cannot map an empty file
        if n_tokens < self.window_length + 1:
            needed = (f"seq_len+2 = {seq_len + 2}" if window_length is None else
                      f"the {self.window_length + 1} that windows of {self.window_length} tokens need")
            raise UserError(f"the {split} split has {n_tokens} tokens, fewer than {needed}; give more text, "
                            "lower --seq_len or raise --val_fraction")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")

    def batch(self, step: int, micro: int = 0) -> torch.Tensor:
        """LongTensor (batch_size, window_length), a pure function of (seed, rank, step, micro)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        high = len(self.tokens) - self.window_length
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=g).numpy()
        # one fancy-index read: (B, 1) + (1, window) offsets
        idx = starts[:, None] + np.arange(self.window_length)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))


# ----------------------------------------------------------------------------- sentences
def split_sentences(tokens: np.ndarray, tokenizer: Tokenizer, chunk: int = 1 << 22):
    """Every sentence of a token stream, in order: (starts, ends, documents), int64 arrays.

    Sentence i is tokens[starts[i]:ends[i]] and lies in document documents[i]; documents are the
    runs between <eos> tokens, which belong to no sentence (an empty document has none).

    A sentence starts at the first piece of a document, and at a text piece that
      (a) comes after a piece ending in . ! ? (closing quotes or brackets glued on are fine:
          `no."`, `(Yes.)`), begins a new word (whitespace between them), and does not begin
          with a lowercase letter; so "It ends. The next" splits, "os.path", "3.14" and
          "e.g. the" do not; or
      (b) comes after a piece ending in a CJK stop 。！？ (closers such as 」 glued on are fine),
          whatever follows: Chinese and Japanese write no space between sentences; or
      (c) comes after a blank line (two newlines or more in the whitespace before it), so
          headings, list items and paragraphs that end without a stop are sentences too.
    Whitespace and glued closers between two sentences belong to the first. Abbreviations
    before a capital ("Mr. Smith") split wrongly: a heuristic, like any splitter that does not
    model the language. The per-piece facts are the tokenizer's tables (tokenizer.py).

    Vectorized: numpy over chunks of the memmap, each text piece compared with the text piece
    before it (the last one of the previous chunk carries over), so memory stays bounded.
    """
    whitespace = tokenizer.whitespace_table.numpy()
    text = ~(whitespace | tokenizer.closer_table.numpy())   # pieces that say something
    text[EOS_ID] = False
    ends_stop = tokenizer.ends_stop_table.numpy()
    ends_cjk_stop = tokenizer.ends_cjk_stop_table.numpy()
    starts_word = tokenizer.starts_word_table.numpy()
    starts_lower = tokenizer.starts_lower_table.numpy()
    newline = tokenizer.newline_table.numpy()

    boundaries, eos_positions = [], []
    last = np.zeros((5, 0), dtype=np.int64)   # the previous chunk's last text piece, as a column
    totals = np.zeros(3, dtype=np.int64)      # whitespace pieces, newlines and <eos> seen so far
    for a in range(0, len(tokens), chunk):
        tok = np.asarray(tokens[a:a + chunk])
        # running counts up to and including each position (a text piece adds nothing to them,
        # so the difference between two text pieces counts what lies between them)
        n_space = totals[0] + np.cumsum(whitespace[tok])
        n_newline = totals[1] + np.cumsum(newline[tok])
        n_eos = totals[2] + np.cumsum(tok == EOS_ID)
        totals = np.array([n_space[-1], n_newline[-1], n_eos[-1]])
        eos_positions.append(np.flatnonzero(tok == EOS_ID) + a)
        at = np.flatnonzero(text[tok])
        cols = np.concatenate([last, np.stack([at + a, tok[at], n_space[at], n_newline[at], n_eos[at]])], axis=1)
        if cols.shape[1] == 0:
            continue
        last = cols[:, -1:]
        pos, piece, space, nl, eos = cols
        prev, cur = piece[:-1], piece[1:]                  # each text piece and the one before it
        new_word = starts_word[cur] | (space[1:] > space[:-1])
        after_stop = (ends_stop[prev] & new_word & ~starts_lower[cur]) | ends_cjk_stop[prev]
        after_blank_line = nl[1:] - nl[:-1] >= 2
        same_document = eos[1:] == eos[:-1]
        boundaries.append(pos[1:][same_document & (after_stop | after_blank_line)])

    n = len(tokens)
    doc_end = np.concatenate(eos_positions) if eos_positions else np.zeros(0, dtype=np.int64)
    if n and tokens[n - 1] != EOS_ID:
        doc_end = np.append(doc_end, n)                    # a stream cut short still ends its document
    doc_start = np.concatenate([[0], doc_end[:-1] + 1]).astype(np.int64)
    nonempty = doc_end > doc_start
    # boundaries lie strictly inside documents, so this is a plain merge
    starts = np.sort(np.concatenate([doc_start[nonempty]] + boundaries)).astype(np.int64)
    documents = np.searchsorted(doc_start, starts, side="right") - 1
    ends = np.minimum(np.append(starts[1:], n), doc_end[documents])
    return starts, ends, documents


def truncate_longest_first(a_len: np.ndarray, b_len: np.ndarray, budget: int):
    """ALBERT's truncate_seq_pair in closed form: take one token at a time from the longer
    segment (from B on a tie) until a_len + b_len <= budget. Arrays in, arrays out."""
    excess = np.maximum(a_len + b_len - budget, 0)
    even_out = np.minimum(excess, np.abs(a_len - b_len))   # first the longer one down to the other
    a_longer = a_len > b_len
    a_len = a_len - np.where(a_longer, even_out, 0)
    b_len = b_len - np.where(a_longer, 0, even_out)
    rest = excess - even_out                               # then both in turn, B first
    return a_len - rest // 2, b_len - (rest + 1) // 2


def pack_pairs(flat: torch.Tensor, x_start, x_len, y_start, y_len, seq_len: int):
    """Rows `[CLS] X [SEP] Y [SEP] [PAD]...` from spans of a flat token tensor.

    Row i's X is flat[x_start[i] : x_start[i] + x_len[i]], Y likewise (all (B,) long tensors,
    x_len + y_len <= seq_len - 3). One gather, no loop; the data source builds pairs with it and
    sentence-order prediction swaps them with it. Returns
        input_ids    (B, seq_len)
        segment_ids  (B, seq_len)  0 on [CLS] X [SEP], 1 on Y [SEP], 0 on padding (BERT's token types)
        lengths      (B,)          x_len + y_len + 3, the real tokens of each row
    """
    t = torch.arange(seq_len, device=flat.device)[None, :]                 # (1, T)
    nx, ny = x_len[:, None], y_len[:, None]                                 # (B, 1)
    in_x = (t >= 1) & (t <= nx)
    in_y = (t >= nx + 2) & (t <= nx + ny + 1)
    source = torch.where(in_x, x_start[:, None] + t - 1, y_start[:, None] + t - nx - 2)
    ids = torch.where(in_x | in_y, flat[torch.where(in_x | in_y, source, 0)], PAD_ID)
    ids = torch.where(t == 0, CLS_ID, ids)
    ids = torch.where((t == nx + 1) | (t == nx + ny + 2), SEP_ID, ids)
    segment_ids = ((t >= nx + 2) & (t <= nx + ny + 2)).long()
    return ids, segment_ids, x_len + y_len + 3


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


class SegmentPairSource:
    """Sentence pairs `[CLS] A [SEP] B [SEP]` ("segment_pairs" data), as ALBERT builds them.

    For each row: a random sentence that has a next one in its document starts a chunk; the chunk
    takes the following sentences of that document while they fit in seq_len - 3 tokens (at
    least two sentences); it is cut at a random sentence boundary, ALBERT's a_end = randint(1,
    len - 1): A = the sentences before the cut, B = those after. If A + B is still too long (one
    long sentence), it is truncated longest-first, A losing tokens at its front and B at its end,
    so the A|B junction, where the order shows, is always kept. A and B are in document order;
    swapping them (or drawing a random B) is the objective's job, on device (see objectives/sop.py).

    Documents with a single sentence cannot make a pair. ALBERT then takes B from a random other
    document and labels it "swapped" even in SOP mode, a mislabelled pair; here such documents
    are skipped: never sampled, counted in `skipped_documents` / `skipped_tokens` and reported
    once when the source is built. A split with no document of two sentences or more is a
    UserError. How sentences are found: `split_sentences`.

    batch(step, micro) is a pure function of (seed, rank, step, micro), like BlockSource's:
        input_ids    (B, seq_len)  [CLS] A [SEP] B [SEP] [PAD]...
        segment_ids  (B, seq_len)  0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding
        lengths      (B,)          real tokens per row, len(A) + len(B) + 3
        a_lengths, b_lengths (B,)  tokens of A and of B
        documents    (B,)          the document each row comes from
    """

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 tokenizer: Tokenizer | None = None, log=None):
        meta = load_meta(folder)
        if meta is None:
            raise UserError(f"no prepared data in {folder}; run train.py with --data to prepare it")
        if seq_len < 5:
            raise UserError(f"sentence pairs need --seq_len 5 or more ([CLS] A [SEP] B [SEP]), got {seq_len}")
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.split_id = 0 if split == "train" else 1
        path = os.path.join(folder, f"{split}.bin")
        dtype = np.dtype(meta["dtype"])
        if os.path.getsize(path) == 0:  # numpy cannot map an empty file
            raise UserError(f"the {split} split is empty; give more text or raise --val_fraction")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        tokenizer = tokenizer if tokenizer is not None else tokenizer_of(folder, meta)

        self.starts, self.ends, self.documents = split_sentences(self.tokens, tokenizer)
        per_document = np.bincount(self.documents)                 # sentences in each document
        self.last_of_document = np.cumsum(per_document) - 1        # index of its last sentence
        # a chunk may start at any sentence followed by another of the same document
        self.pair_starts = np.flatnonzero(self.documents[1:] == self.documents[:-1])
        single = per_document[self.documents] == 1                 # per sentence
        self.skipped_documents = int((per_document == 1).sum())
        self.skipped_tokens = int((self.ends - self.starts)[single].sum())
        n_docs = int((per_document > 0).sum())
        if len(self.pair_starts) == 0:
            raise UserError(f"the {split} split has no document with two sentences or more, so it makes no "
                            "sentence pairs; sentence-order objectives need multi-sentence documents")
        if log is not None:
            log(f"segment pairs ({split}): {n_docs:,} documents, {len(self.starts):,} sentences"
                + (f"; {self.skipped_documents:,} single-sentence documents skipped "
                   f"({self.skipped_tokens / max(1, len(self.tokens)):.1%} of the tokens)"
                   if self.skipped_documents else ""))

    def batch(self, step: int, micro: int = 0) -> dict:
        rng = np.random.default_rng(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        budget = self.seq_len - 3
        first = self.pair_starts[rng.integers(0, len(self.pair_starts), size=self.batch_size)]
        last = self.last_of_document[self.documents[first]]
        # the chunk is sentences first .. end-1: as many as fit, at least two, within the document
        end = np.searchsorted(self.ends, self.starts[first] + budget, side="right")
        end = np.clip(end, first + 2, last + 1)
        cut = rng.integers(first + 1, end)                         # B's first sentence
        a_start, b_start, b_end = self.starts[first], self.starts[cut], self.ends[end - 1]
        a_len, b_len = truncate_longest_first(b_start - a_start, b_end - b_start, budget)
        a_start = b_start - a_len
        # A and B are adjacent in the memmap: one fancy-index read of a window per row
        window = np.minimum(a_start[:, None] + np.arange(budget)[None, :], len(self.tokens) - 1)
        flat = torch.from_numpy(self.tokens[window].astype(np.int64)).flatten()
        row_start = torch.arange(self.batch_size) * budget
        a_len, b_len = torch.from_numpy(a_len), torch.from_numpy(b_len)
        input_ids, segment_ids, lengths = pack_pairs(flat, row_start, a_len, row_start + a_len, b_len, self.seq_len)
        return {"input_ids": input_ids, "segment_ids": segment_ids, "lengths": lengths,
                "a_lengths": a_len, "b_lengths": b_len, "documents": torch.from_numpy(self.documents[first])}


def make_source(kind: str, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0,
                rank: int = 0, log=print, window_length: int | None = None):
    """The data source an objective reads (its `data` attribute), over prepared token files.
    window_length: the raw tokens per row a "blocks" reader takes (Objective.window_length;
    seq_len + 1 when None)."""
    if kind == "blocks":
        return BlockSource(folder, split, seq_len, batch_size, seed=seed, rank=rank, window_length=window_length)
    if kind == "segment_pairs":
        return SegmentPairSource(folder, split, seq_len, batch_size, seed=seed, rank=rank, log=log)
    raise UserError(f"no data source named {kind!r}")
