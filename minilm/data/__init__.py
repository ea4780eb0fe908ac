"""From text on disk to training batches: the data/ package.

One module per step, one per source:
    reading.py        text formats, folders, globs, compression, the built-in corpus; rows of tables
    preparation.py    documents -> folder/train.bin, val.bin, meta.json (tokenized once, all cores)
    rows.py           rows of a table -> the same token files plus an (n_rows, n_columns, 2) index
    blocks.py         BlockSource: random windows of running text      ("blocks")
    segment_pairs.py  SegmentPairSource: [CLS] A [SEP] B [SEP]          ("segment_pairs")
    labelled.py       LabelledSource: [CLS] text [SEP] with a label      ("labelled"; classify)
    sentences.py      SentenceSource: [CLS] sentence [SEP]              ("sentences", simcse)
    pairs.py          PairSource: (anchor, positive[, hard negative])   ("pairs", simcse_sup)
    parallel.py       ParallelSource: <eos> src <eos> <eos> tgt <eos>  ("parallel", rows; tlm)
SOURCES maps the name an objective declares (its `data` attribute) to the class that reads it;
each class says which preparation it reads (`prepares`: "documents" or "rows").

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

from minilm.data.blocks import BlockSource, mix_seed
from minilm.data.preparation import (
    Stopped,
    inspect_prepared,
    load_meta,
    prepare,
    stop_on_sigterm,
    token_dtype,
    tokenizer_fingerprint,
    tokenizer_of,
)
from minilm.data.reading import (
    BUILTIN,
    CHUNK_CHARS,
    DOC_SEPARATOR,
    PROGRESS_EVERY,
    READ_BYTES,
    builtin_documents,
    display,
    file_format,
    iter_pieces,
    iter_rows,
    iter_texts,
    resolve_files,
    tokenizer_texts,
)
from minilm.data.parallel import ParallelSource, pack_translation, truncate_in_proportion  # tlm
from minilm.data.rows import RowTable, prepare_rows, row_texts
from minilm.data.labelled import LabelledSource  # classify
from minilm.data.segment_pairs import (
    SegmentPairSource,
    pack_pairs,
    split_sentences,
    truncate_longest_first,
)
from minilm.errors import UserError
# simcse: single sentences and (anchor, positive[, negative]) rows
from minilm.data.sentences import SentenceSource, frame_sentences
from minilm.data.pairs import PairSource

# name -> the class that reads it; an objective names its source in its `data` attribute
SOURCES = {
    "blocks": BlockSource,
    "segment_pairs": SegmentPairSource,
    "labelled": LabelledSource,   # classify: [CLS] text [SEP] rows with a label (labelled.py)
    # simcse (objectives/simcse.py)
    "sentences": SentenceSource,
    "pairs": PairSource,
    "parallel": ParallelSource,   # tlm: translation pairs (data/parallel.py)
}


def source_class(kind: str):
    if kind not in SOURCES:
        raise UserError(f"no data source named {kind!r} (there are: {', '.join(SOURCES)})")
    return SOURCES[kind]


def make_source(kind: str, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0,
                rank: int = 0, log=print, window_length: int | None = None):
    """The data source an objective reads (its `data` attribute), over prepared token files.
    window_length: the raw tokens per row a "blocks" reader takes (Objective.window_length;
    seq_len + 1 when None)."""
    return source_class(kind)(folder, split, seq_len, batch_size, seed=seed, rank=rank, log=log,
                              window_length=window_length)


__all__ = ["BUILTIN", "CHUNK_CHARS", "DOC_SEPARATOR", "PROGRESS_EVERY", "READ_BYTES", "SOURCES", "BlockSource",
           "LabelledSource", "RowTable", "SegmentPairSource", "Stopped", "builtin_documents", "display", "file_format",
           "inspect_prepared", "iter_pieces", "iter_rows", "iter_texts", "load_meta", "make_source", "mix_seed",
           "pack_pairs", "prepare", "prepare_rows", "resolve_files", "row_texts", "source_class", "split_sentences",
           "stop_on_sigterm", "token_dtype", "tokenizer_fingerprint", "tokenizer_of", "tokenizer_texts",
           "truncate_longest_first"]
__all__ += ["PairSource", "SentenceSource", "frame_sentences"]   # simcse
