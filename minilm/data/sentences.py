"""Single sentences `[CLS] sentence [SEP]` from running text, for contrastive sentence embeddings
(unsupervised SimCSE, objectives/simcse.py: "sentences" data).

    SentenceSource(folder, "train", seq_len, batch_size).batch(step) -> {
        input_ids          (B, seq_len)  [CLS] sentence [SEP] [PAD]...
        lengths            (B,)          real tokens per row (the sentence's + 2)
        neighbour_ids      (B, seq_len)  the same framing of a neighbouring sentence of the same
        neighbour_lengths  (B,)          document: the next one, or the previous one for a
        has_neighbour      (B,) bool     document's last sentence; none in a one-sentence document
        documents          (B,)          the document each sentence comes from }

Sentences are found once, when the source is built, by the sentence splitter of segment_pairs.py
(split_sentences); a batch is B sentences drawn uniformly (with replacement), a pure function of
(seed, rank, step, micro) like every source's, so a resumed run reads what an uninterrupted one
would have. A sentence longer than seq_len - 2 tokens keeps its first seq_len - 2; the
whitespace the splitter leaves at a sentence's end ("It ends. " keeps its space, a paragraph's
last sentence its newlines) is dropped, so a training sentence looks like a text given to
embed(), which has none.

Why the neighbour: unsupervised SimCSE has no labelled positive pairs, and in evaluation, with
dropout off, its two views of a sentence are one vector. The sentence next to it in its document
is the nearest thing to a held-out positive that running text offers (same topic, often the same
entities); objectives/simcse.py measures alignment and retrieval on those pairs. Training ignores
it (reading it costs one more (B, seq_len) gather per batch).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from minilm.data.blocks import mix_seed
from minilm.data.preparation import load_meta, tokenizer_of
from minilm.data.segment_pairs import split_sentences
from minilm.errors import UserError
from minilm.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer


def frame_sentences(ids: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `[CLS] text [SEP] [PAD]...` from right-padded texts: ids (B, W) whose row b holds
    lengths[b] <= seq_len - 2 real tokens. Returns (input_ids (B, seq_len), lengths + 2). One
    scatter-free where(), no loop; the sources and minilm/api.py's embed frame texts with it."""
    B, W = ids.shape
    t = torch.arange(seq_len, device=ids.device)[None, :]                    # (1, T)
    n = lengths[:, None]                                                     # (B, 1)
    inside = (t >= 1) & (t <= n)
    text = ids.gather(1, (t - 1).clamp(0, max(W - 1, 0)).expand(B, -1)) if W else torch.zeros_like(t).expand(B, -1)
    out = torch.where(inside, text, PAD_ID)
    out = torch.where(t == 0, CLS_ID, out)
    out = torch.where(t == n + 1, SEP_ID, out)
    return out, lengths + 2


def strip_trailing(ids: np.ndarray, lengths: np.ndarray, is_whitespace: np.ndarray) -> np.ndarray:
    """The lengths of rows `ids` (B, W) without the whitespace pieces at their end (a row of only
    whitespace keeps its length: it has nothing else)."""
    W = ids.shape[1]
    t = np.arange(W)[None, :]
    keeps = (t < lengths[:, None]) & ~is_whitespace[ids]                     # (B, W)
    last = W - 1 - np.argmax(keeps[:, ::-1], axis=1)                          # last True per row
    return np.where(keeps.any(axis=1), last + 1, lengths)


class SentenceSource:
    """Single sentences of a token stream, framed `[CLS] sentence [SEP]` ("sentences" data);
    see the module docstring for what a batch holds."""

    prepares = "documents"   # running text (minilm/data/preparation.py), sentence-split here

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 log=None, window_length: int | None = None, tokenizer: Tokenizer | None = None):
        meta = load_meta(folder)
        if meta is None:
            raise UserError(f"no prepared data in {folder}; run train.py with --data to prepare it")
        if seq_len < 3:
            raise UserError(f"sentences need --seq_len 3 or more ([CLS] sentence [SEP]), got {seq_len}")
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.split_id = 0 if split == "train" else 1
        path = os.path.join(folder, f"{split}.bin")
        if os.path.getsize(path) == 0:  # numpy cannot map an empty file
            raise UserError(f"the {split} split is empty; give more text or raise --val_fraction")
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        tokenizer = tokenizer if tokenizer is not None else tokenizer_of(folder, meta)
        self.is_whitespace = tokenizer.whitespace_table.numpy()
        self.starts, self.ends, self.documents = split_sentences(self.tokens, tokenizer)
        if len(self.starts) == 0:
            raise UserError(f"the {split} split has no sentence; give more text or raise --val_fraction")
        # each sentence's neighbour in its document: the next one, else the previous one, else none
        n = len(self.starts)
        same_as_next = np.append(self.documents[1:] == self.documents[:-1], False)
        same_as_previous = np.concatenate([[False], self.documents[1:] == self.documents[:-1]])
        index = np.arange(n)
        self.neighbours = np.where(same_as_next, index + 1, np.where(same_as_previous, index - 1, -1))
        if log is not None:
            n_docs = len(np.unique(self.documents))
            too_long = int(((self.ends - self.starts) > seq_len - 2).sum())
            log(f"sentences ({split}): {n:,} sentences in {n_docs:,} documents"
                + (f"; {too_long:,} longer than seq_len - 2 = {seq_len - 2} tokens are cut to it" if too_long else ""))

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, sentences: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Sentences by index -> (input_ids (N, seq_len), lengths (N,)): one fancy-index read."""
        width = self.seq_len - 2
        start = self.starts[sentences]
        length = np.minimum(self.ends[sentences] - start, width)
        t = np.arange(width)[None, :]
        window = self.tokens[np.minimum(start[:, None] + t, len(self.tokens) - 1)].astype(np.int64)
        length = strip_trailing(window, length, self.is_whitespace)
        return frame_sentences(torch.from_numpy(window), torch.from_numpy(length), self.seq_len)

    def batch(self, step: int, micro: int = 0) -> dict:
        rng = np.random.default_rng(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        return self.items(rng.integers(0, len(self.starts), size=self.batch_size))

    # --epochs (minilm/epochs.py): the sentences in an order of its choosing
    def epoch_size(self) -> int:
        return len(self.starts)

    def items(self, rows: np.ndarray) -> dict:
        """The batch of the given sentences (B,)."""
        neighbours = self.neighbours[rows]
        input_ids, lengths = self.read(rows)
        neighbour_ids, neighbour_lengths = self.read(np.maximum(neighbours, 0))
        return {"input_ids": input_ids, "lengths": lengths, "neighbour_ids": neighbour_ids,
                "neighbour_lengths": neighbour_lengths, "has_neighbour": torch.from_numpy(neighbours >= 0),
                "documents": torch.from_numpy(self.documents[rows])}
