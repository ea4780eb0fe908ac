"""Reading text sources: file formats, folders and globs, compression, the built-in corpus.

iter_pieces(source, text_field) yields (text, ends_document) pieces in a fixed order; a long
document comes in pieces of about CHUNK_CHARS, so nothing needs to fit in memory. iter_rows reads
the rows of a table (.tsv/.csv/.jsonl) whole, several named columns at once, for the row sources.
The rules for what counts as a document are in minilm/data/__init__.py.
"""
from __future__ import annotations

import ast
import bz2
import contextlib
import csv
import errno
import glob
import gzip
import itertools
import json
import lzma
import os
import re
import stat
import sysconfig
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from minilm.errors import UserError
from minilm.tokenizer import Tokenizer

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


def _parse_json(line: str, where: str, hint: str = "", object_pairs_hook=None):
    try:
        return json.loads(line, object_pairs_hook=object_pairs_hook)
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
    """The column `field` of each row of a CSV/TSV file with a header row (_rows_of_csv, one column)."""
    for (text,) in _rows_of_csv(f, path, [(field, "--text_field")], set(), stats, delimiter):
        if text is not None:
            yield text


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




# ----------------------------------------------------------------------------- rows of a table
TABLE_FORMATS = ("jsonl", "json", "csv", "tsv")


def _cell(value, column: str, flag: str, where: str, stats: ReadStats) -> str:
    """One cell of a row as text: strings as they are, numbers and booleans as JSON spells them
    (a label may be 3 or true); anything else is an error that names the flag."""
    if isinstance(value, str):
        text, lone = LONE_SURROGATE.subn("\ufffd", value)
        stats.replaced += lone
        return text
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise UserError(f"{where}: the {column!r} field is not a string (it is {type(value).__name__}); "
                    f"{flag} must name a text or label column")


class _JsonObject(dict):
    """A JSON object of a row file; `twice`: a field to read that it names twice, or None."""
    twice: str | None = None


def _rows_of_json(f, path: str, columns: list[tuple[str, str]], optional: set[str], stats: ReadStats):
    """Tuples of the named fields' cells, row by row: None for a null, and for an optional field a
    row leaves out. A required field a row leaves out is an error; so is an optional one that no
    row of the file has (its flag named it: a typo, not a file without such cells), and a row that
    names a field to read twice."""
    hint = "; a .json file holds JSON Lines (one object per line) or one array of objects"
    unseen = {column: flag for column, flag in columns if column in optional}
    flags = dict(columns)
    read = 0

    def object_of(pairs):   # json keeps the last of two equal keys: which one is meant is unknowable
        row = _JsonObject(pairs)
        if len(row) < len(pairs):
            names = [name for name, _ in pairs]
            row.twice = next((name for name in names if name in flags and names.count(name) > 1), None)
        return row
    for lineno, raw in enumerate(f, 1):
        line = _decode(raw, stats)
        line = (line.removeprefix(BOM) if lineno == 1 else line).strip()
        if not line:
            continue
        if line.startswith("["):
            rows = _parse_json(line + _decode(f.read(), stats), f"{display(path)}:{lineno}", hint, object_of)
            rows = rows if isinstance(rows, list) else [rows]
            places = [f"{display(path)}: element {i} of the array" for i in range(len(rows))]
        else:
            rows = [_parse_json(line, f"{display(path)}:{lineno}", hint, object_of)]
            places = [f"{display(path)}:{lineno}"]
        for row, place in zip(rows, places):
            if not isinstance(row, dict):
                raise UserError(f"{place}: a row must be a JSON object with named fields")
            if row.twice is not None:
                raise UserError(f"{place}: this row has the field {row.twice!r}, which {flags[row.twice]} names, "
                                "twice; keep one of them")
            cells = []
            for column, flag in columns:
                if column not in row and column not in optional:
                    raise UserError(f"{place}: no {column!r} field in this row; pass {flag} NAME to read another field")
                value = row.get(column)
                if column in row:
                    unseen.pop(column, None)
                cells.append(None if value is None else _cell(value, column, flag, place, stats))
            read += 1
            yield tuple(cells)
    if unseen and read:
        column, flag = next(iter(unseen.items()))
        raise UserError(f"{display(path)}: no row has a {column!r} field; pass {flag} NAME to read another field "
                        f"(or leave {flag} out)")


def _rows_of_csv(f, path: str, columns: list[tuple[str, str]], optional: set[str], stats: ReadStats,
                 delimiter: str):
    """Tuples of the named columns' cells, row by row (None where a row is too short for one). The
    header must name each column once: a column it lacks or names twice is an error, optional or
    not (its flag named it)."""
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
        index = [_column_index(header, column, flag, path) for column, flag in columns]
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            yield tuple(None if i >= len(row) else row[i] for i in index)
    except csv.Error as err:
        raise UserError(f"{display(path)}:{reader.line_num}: {err}") from None


def _column_index(header: list[str], column: str, flag: str, path: str) -> int:
    """Where `column` is in a .tsv/.csv header; a one-line error when it is not there, or there twice
    (which of the two the user means is unknowable)."""
    places = [i for i, name in enumerate(header) if name == column]
    if not places:
        names = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
        raise UserError(f"{display(path)} has no column {column!r} (its columns: {names}); "
                        f"pass {flag} NAME to read another column")
    if len(places) > 1:
        raise UserError(f"{display(path)} has {len(places)} columns named {column!r} (columns "
                        f"{' and '.join(str(i + 1) for i in places)} of its header), which {flag} names; "
                        "rename all but one of them in the header")
    return places[0]


def iter_rows(source: str, columns: list[tuple[str, str]], *, optional: set[str] = frozenset(),
              files: list[str] | None = None, stats: ReadStats | None = None,
              progress: Progress | None = None) -> Iterator[tuple[str | None, ...]]:
    """The rows of a table source, each a tuple of the named columns' cells, in a fixed order.

    columns: (column name, the flag that names it) pairs, the flag for error messages. Every column
    must be in every file: a .tsv/.csv header that lacks one (or names it twice), or a JSON file no
    row of which has it, is a UserError. A row may leave out a column in `optional` (a JSON row
    without the field): its cell is None, as for a null or a .tsv/.csv row too short to reach it.
    Only .tsv/.csv (with a header) and .jsonl/.json hold rows: plain text is refused in one line.
    stats.documents counts the rows, stats.chars the characters of their cells."""
    stats = stats if stats is not None else ReadStats()
    if source == BUILTIN:
        raise UserError("this objective reads rows of a table (.tsv/.csv with a header, or .jsonl); "
                        "the built-in corpus has none: pass --data FILE")
    for path in (files if files is not None else resolve_files(source)):
        kind = file_format(path)
        if kind not in TABLE_FORMATS:
            raise UserError(f"{display(path)} is plain text, but this objective reads rows of a table: give a "
                            ".tsv/.csv file with a header row or a .jsonl file, one example per row")
        stats.files += 1
        try:
            with open_data_file(path) as f:
                rows = (_rows_of_csv(f, path, columns, optional, stats, "," if kind == "csv" else "\t")
                        if kind in ("csv", "tsv") else _rows_of_json(f, path, columns, optional, stats))
                for row in rows:
                    chars = sum(len(cell) for cell in row if cell is not None)
                    stats.documents += 1
                    stats.chars += chars
                    if progress is not None:
                        progress.add(chars)
                    yield row
        except READ_ERRORS as err:
            raise UserError(f"cannot read {display(path)}: {_reason(err)}") from None
    if stats.replaced > max(16, MAX_INVALID_UTF8 * stats.chars):
        raise UserError(f"--data {display(source)} is not UTF-8 text ({stats.replaced:,} invalid bytes in "
                        f"{stats.chars:,} characters); convert it first, e.g. iconv -f latin1 -t utf-8")
