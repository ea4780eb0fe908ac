"""From text on disk to random training windows.

    prepare(source, tokenizer, folder)  ->  folder/train.bin, folder/val.bin, folder/meta.json,
                                            folder/tokenizer.model (the tokenizer that made them)
    BlockSource(folder, "train", ...)   ->  .batch(step) = LongTensor (batch_size, seq_len + 1)
    SegmentPairSource(folder, "train", ...)  ->  .batch(step) = {"input_ids": [CLS] A [SEP] B [SEP], ...}

What counts as a document:
  * a .jsonl file: one document per line, its text in the field `text_field`;
  * any other text file: one document, unless it contains lines that are exactly
    `<|endoftext|>`, which separate documents inside the file (the convention of GPT-2 dumps);
  * a folder: every non-hidden file below it, in sorted order; a glob: every file it matches.
After each document comes the end-of-document token <eos> (id 3), so a model learns where texts end.

The validation split is by document (max(1, round(val_fraction * n_docs)) documents, evenly
spaced), so no document has text on both sides. A corpus that is a single document is cut at a
line boundary instead: its last val_fraction goes to validation.

Streaming: files are read line by line and handed to worker processes in chunks of about 1 MB,
which encode them while the main process appends the ids to the memmaps, so neither the text nor
the tokens ever need to fit in memory. Bytes that are not valid UTF-8 are replaced by U+FFFD and
counted in the summary, never dropped silently.

Batches: a window of seq_len + 1 tokens starting at a uniformly random offset; the offsets of a
batch are a pure function of (seed, rank, step, micro-step), so a resumed run reads exactly the
windows an uninterrupted one would have read. Segment pairs (for sentence-order prediction) are
drawn the same way, from sentences found once, with numpy, when the source is built.
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import multiprocessing as mp
import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from minilm.errors import UserError
from minilm.tokenizer import CLS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer

DOC_SEPARATOR = "<|endoftext|>"
CHUNK_CHARS = 1 << 20
MAX_INVALID_UTF8 = 0.01  # share of invalid UTF-8 bytes above which a corpus is refused
BUILTIN = "builtin"


# ----------------------------------------------------------------------------- reading text
@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    chars: int = 0
    replaced: int = 0      # bytes that were not valid UTF-8, replaced by U+FFFD


def resolve_files(path: str) -> list[str]:
    """The list of files behind --data; raises UserError when there is nothing to read."""
    if not path:
        raise UserError("--data is empty; give a text file, a folder, a glob or a .jsonl file")
    if os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        if not files:
            raise UserError(f"the folder {path} holds no files; put .txt or .jsonl files in it")
    elif os.path.isfile(path):
        files = [path]
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise UserError(f"the pattern {path} matches no files")
    else:
        raise UserError(f"--data {path} does not exist; give a text file, a folder, a glob or a .jsonl file")
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(8192)
        if b"\x00" in head:
            raise UserError(f"{f} looks binary (it contains NUL bytes); --data takes text files only")
    if all(os.path.getsize(f) == 0 for f in files):
        raise UserError(f"--data {path} is empty: its files hold no text")
    return files


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


def _pieces_of_text_file(path: str, stats: ReadStats, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces, each at most ~chunk_chars, cut only after a newline.

    A document that is only whitespace (e.g. blank lines after the last separator) is dropped,
    unless part of it was already handed out, which then still needs its end.
    """
    parts, size, has_text, started = [], 0, False, False  # started: a piece of it was yielded
    with open(path, "rb") as f:
        for raw in f:
            line = _decode(raw, stats)
            if line.rstrip("\r\n") == DOC_SEPARATOR:
                if has_text or started:
                    yield "".join(parts), True
                parts, size, has_text, started = [], 0, False, False
                continue
            parts.append(line)
            size += len(line)
            has_text = has_text or bool(line.strip())
            if size >= chunk_chars:
                yield "".join(parts), False
                parts, size, started = [], 0, True
    if has_text or started:
        yield "".join(parts), True


def _cut_at_lines(text: str, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    """One document as (text, ends_document) pieces of about chunk_chars, cut only after a newline
    (like a text file is read), so even a single-row .jsonl corpus can be split for validation."""
    start = 0
    while len(text) - start > chunk_chars:
        cut = text.find("\n", start + chunk_chars - 1) + 1  # just after the first newline past the limit
        if cut == 0 or cut == len(text):
            break
        yield text[start:cut], False
        start = cut
    yield text[start:], True


def _pieces_of_jsonl(path: str, field: str, stats: ReadStats, chunk_chars: int) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, stats).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{lineno}: this line is not valid JSON") from None
            if not isinstance(row, dict) or field not in row:
                raise UserError(f"{path}:{lineno}: no {field!r} field in this row; "
                                f"pass --text_field NAME to read another field")
            text = row[field]
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: the {field!r} field is not a string")
            if text.strip():
                yield from _cut_at_lines(text, chunk_chars)


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


def iter_pieces(source: str, text_field: str = "text", stats: ReadStats | None = None,
                chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, bool]]:
    """Every (text, ends_document) piece of a source, in a fixed order."""
    stats = stats if stats is not None else ReadStats()
    if source == BUILTIN:
        for doc in builtin_documents():
            stats.documents += 1
            stats.chars += len(doc)
            yield doc, True
        return
    for path in resolve_files(source):
        stats.files += 1
        pieces = (_pieces_of_jsonl(path, text_field, stats, chunk_chars) if path.endswith(".jsonl")
                  else _pieces_of_text_file(path, stats, chunk_chars))
        for text, ends in pieces:
            stats.chars += len(text)
            stats.documents += ends
            yield text, ends
    if stats.replaced > max(16, MAX_INVALID_UTF8 * stats.chars):
        # a few bad bytes are replaced and counted; this many means another encoding
        raise UserError(f"--data {source} is not UTF-8 text ({stats.replaced:,} invalid bytes in "
                        f"{stats.chars:,} characters); convert it first, e.g. iconv -f latin1 -t utf-8")


def iter_texts(source: str, text_field: str = "text") -> Iterator[str]:
    """Just the text, e.g. to train a tokenizer on."""
    for text, _ in iter_pieces(source, text_field):
        yield text


# ----------------------------------------------------------------------------- prepare
_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _worker_tokenizer  # one tokenizer per worker process, built once
    _worker_tokenizer = Tokenizer(model_bytes)


def _encode_job(job: list[tuple[str, bool, bool]]) -> list[tuple[np.ndarray, bool]]:
    """Encode a list of (text, ends_document, is_val); append <eos> where a document ends."""
    tok = _worker_tokenizer
    ids = tok.encode_batch([text for text, _, _ in job])
    out = []
    for (_, ends, is_val), piece in zip(job, ids):
        if ends:
            piece = piece + [EOS_ID]
        out.append((np.asarray(piece, dtype=np.uint32), is_val))
    return out


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


def prepare(source: str, tokenizer: Tokenizer, folder: str, *, text_field: str = "text",
            val_fraction: float = 0.05, num_workers: int = 0, log=print) -> dict:
    """Tokenize `source` into folder/train.bin and folder/val.bin; return (and save) the meta."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    # pass 1: count documents and characters, without tokenizing, to place the split
    count = ReadStats()
    for _ in iter_pieces(source, text_field, count):
        pass
    if count.chars == 0 or count.documents == 0:
        raise UserError(f"--data {source} holds no text")
    single = count.documents == 1
    n_val = max(1, round(val_fraction * count.documents))
    # evenly spaced validation documents: index i is val when floor((i+1)*k/n) > floor(i*k/n)
    is_val_doc = lambda i: (i + 1) * n_val // count.documents > i * n_val // count.documents  # noqa: E731
    chunk = max(1, min(CHUNK_CHARS, count.chars // 200)) if single else CHUNK_CHARS

    stats = ReadStats()

    def labelled():
        doc, seen = 0, 0
        for text, ends in iter_pieces(source, text_field, stats, chunk_chars=chunk):
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
    files = {k: open(v, "wb") for k, v in tmp.items()}
    try:
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_bytes,))
            results = pool.imap(_encode_job, _jobs(labelled()), chunksize=1)
        else:
            pool = None
            _init_worker(tokenizer.model_bytes)
            results = map(_encode_job, _jobs(labelled()))
        try:
            for job_result in results:
                for ids, is_val in job_result:
                    files[is_val].write(ids.astype(dtype).tobytes())
                    counts[is_val] += len(ids)
                    docs[is_val] += int(len(ids) > 0 and ids[-1] == EOS_ID)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        for f in files.values():
            f.close()
    for k in paths:
        os.replace(tmp[k], paths[k])
    tokenizer.save(os.path.join(folder, "tokenizer.model"))  # sources that need word or sentence facts read it
    meta = dict(vocab_size=tokenizer.vocab_size, dtype=np.dtype(dtype).name,
                train_tokens=counts[False], val_tokens=counts[True],
                train_documents=docs[False], val_documents=docs[True], source=source,
                files=stats.files, chars=stats.chars, replaced_invalid_utf8=stats.replaced,
                tokenizer=tokenizer_fingerprint(tokenizer))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log(f"prepared {source}: {stats.documents} documents, {stats.chars:,} characters -> "
        f"{counts[False]:,} train / {counts[True]:,} val tokens ({meta['dtype']})"
        + (f"; {stats.replaced} invalid UTF-8 bytes replaced by U+FFFD" if stats.replaced else ""))
    return meta


def load_meta(folder: str) -> dict | None:
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
    """Random windows of seq_len + 1 tokens from a token memmap ("blocks" data)."""

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0):
        meta = load_meta(folder)
        if meta is None:
            raise UserError(f"no prepared data in {folder}; run train.py with --data to prepare it")
        self.path = os.path.join(folder, f"{split}.bin")
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.split_id = 0 if split == "train" else 1
        dtype = np.dtype(meta["dtype"])
        n_tokens = os.path.getsize(self.path) // dtype.itemsize  # checked first: numpy cannot map an empty file
        if n_tokens < seq_len + 2:
            raise UserError(f"the {split} split has {n_tokens} tokens, fewer than seq_len+2 = "
                            f"{seq_len + 2}; give more text, lower --seq_len or raise --val_fraction")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")

    def batch(self, step: int, micro: int = 0) -> torch.Tensor:
        """LongTensor (batch_size, seq_len + 1), a pure function of (seed, rank, step, micro)."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        high = len(self.tokens) - (self.seq_len + 1)
        starts = torch.randint(0, high + 1, (self.batch_size,), generator=g).numpy()
        # one fancy-index read: (B, 1) + (1, T+1) offsets
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
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
                rank: int = 0, log=print):
    """The data source an objective reads (its `data` attribute), over prepared token files."""
    if kind == "blocks":
        return BlockSource(folder, split, seq_len, batch_size, seed=seed, rank=rank)
    if kind == "segment_pairs":
        return SegmentPairSource(folder, split, seq_len, batch_size, seed=seed, rank=rank, log=log)
    raise UserError(f"no data source named {kind!r}")
