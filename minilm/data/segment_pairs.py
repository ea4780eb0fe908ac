"""Sentences of a token stream, and pairs of sentence runs `[CLS] A [SEP] B [SEP]` for the
sentence-order objectives ("segment_pairs" data).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from minilm.data.blocks import mix_seed
from minilm.data.preparation import load_meta, tokenizer_of
from minilm.errors import UserError
from minilm.tokenizer import CLS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer


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

    prepares = "documents"

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 log=None, window_length: int | None = None, tokenizer: Tokenizer | None = None):
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


