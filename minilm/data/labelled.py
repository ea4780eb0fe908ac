"""Labelled rows `[CLS] text [SEP]`, for fine-tuning a classifier ("labelled" data).

    LabelledSource(folder, "train", seq_len, batch_size).batch(step, micro) -> dict of (B, ...) tensors
    LabelledSource(folder, "val", ...).eval_batch(i), i < eval_batch_count()   every row once, in order

The rows come from a table (.tsv/.csv with a header, or .jsonl): the text in --text_field, the
label in --label_field; train.py prepares them with minilm/data/rows.py (the labels are mapped to
ids once, sorted, and stored in meta.json; the objective stores them in the checkpoint).

Each row is framed as BERT frames a single sentence: [CLS] text [SEP], then padding. A text longer
than seq_len - 2 tokens keeps its first seq_len - 2 (BERT's truncation of a single segment): the
[SEP] always closes the row, so a causal backbone's last real token is the same marker in every
row, whatever the text's length.

Training batches are rows drawn uniformly at random (with replacement), a pure function of (seed,
rank, step, micro) like BlockSource's windows, so a resumed run reads what an uninterrupted one
would have read. Evaluation visits every row exactly once instead: batch i holds rows i*B ..
i*B + B - 1; the rows past the end of the split (the last batch's tail, or a whole batch a rank
runs only so that every rank runs the same number of forwards) are padding rows, marked
row_valid False, that the objective counts nowhere.

A batch:
    input_ids  (B, seq_len)  [CLS] text [SEP] [PAD]...
    lengths    (B,)          real tokens per row: len(text) + 2 (2 on a padding row)
    labels     (B,)          label ids, 0 .. n_labels - 1
    row_valid  (B,) bool     False on evaluation padding rows
    rows       (B,)          the row's index in its split (-1 on padding rows)
"""
from __future__ import annotations

import numpy as np
import torch

from minilm.data.blocks import mix_seed
from minilm.data.rows import RowTable
from minilm.errors import UserError
from minilm.tokenizer import CLS_ID, PAD_ID, SEP_ID


def readers_of(data: str) -> str:
    """The registered objectives that read `data` (Objective.data), for a message: "a or b"."""
    from minilm.objectives import OBJECTIVES   # the registry imports the data sources' modules
    names = [cls.name for cls in OBJECTIVES.values() if cls.data == data]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class LabelledSource:
    """Rows of text with a label ("labelled" data), for a classifier."""

    prepares = "rows"   # prepared by minilm/data/rows.py: a table's rows, not running text

    @classmethod
    def row_columns(cls, data_cfg):
        """(columns, optional columns, label column) that train.py prepares (see rows.prepare_rows)."""
        return [(data_cfg.text_field, "--text_field")], set(), data_cfg.label_field

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 log=None, window_length: int | None = None):
        if seq_len < 3:
            raise UserError(f"labelled rows need --seq_len 3 or more ([CLS] text [SEP]), got {seq_len}")
        self.table = RowTable(folder, split)
        if self.table.labels is None:
            raise UserError(f"the prepared data in {folder} has no label column; prepare it again for "
                            f"--objective {readers_of('labelled')} (a fresh --out_dir)")
        self.label_names = self.table.label_names
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.split_id = 0 if split == "train" else 1
        truncated = int((self.table.lengths[:, 0] > seq_len - 2).sum())
        if log is not None:
            log(f"labelled rows ({split}): {len(self.table):,} rows, {len(self.label_names)} labels"
                + (f"; {truncated:,} texts longer than {seq_len - 2} tokens keep their first {seq_len - 2}"
                   if truncated else ""))

    def __len__(self) -> int:
        return len(self.table)

    def rows_batch(self, rows: np.ndarray, valid: np.ndarray) -> dict:
        """The batch of the given row indices (B,), padding rows where `valid` is False."""
        safe = np.where(valid, rows, 0)
        text, text_len = self.table.cells(safe, 0, self.seq_len - 2)       # (B, T-2), (B,)
        B, T = len(rows), self.seq_len
        ids = np.full((B, T), PAD_ID, dtype=np.int64)
        ids[:, 0] = CLS_ID
        ids[:, 1:T - 1] = text
        ids[np.arange(B), text_len + 1] = SEP_ID                          # right after the text
        text_len = np.where(valid, text_len, 0)
        ids[~valid, 1:] = PAD_ID
        ids[~valid, 1] = SEP_ID                                           # a padding row: [CLS] [SEP]
        return {"input_ids": torch.from_numpy(ids), "lengths": torch.from_numpy(text_len + 2),
                "labels": torch.from_numpy(np.where(valid, self.table.labels[safe], 0).astype(np.int64)),
                "row_valid": torch.from_numpy(valid.copy()),
                "rows": torch.from_numpy(np.where(valid, rows, -1).astype(np.int64))}

    def batch(self, step: int, micro: int = 0) -> dict:
        """batch_size rows drawn uniformly at random: a pure function of (seed, rank, step, micro)."""
        rng = np.random.default_rng(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        return self.items(rng.integers(0, len(self.table), size=self.batch_size))

    # --epochs (minilm/epochs.py): the rows in an order of its choosing
    def epoch_size(self) -> int:
        return len(self.table)

    def items(self, rows: np.ndarray) -> dict:
        return self.rows_batch(rows, np.ones(len(rows), dtype=bool))

    # --------------------------------------------------------------- evaluation: every row once
    def eval_batch_count(self) -> int:
        """Batches that cover the split: ceil(rows / batch_size)."""
        return -(-len(self.table) // self.batch_size)

    def eval_batch(self, i: int) -> dict:
        """Rows i*B .. i*B + B - 1 in order; those past the end are padding rows (row_valid False).
        Any i >= 0 is allowed: past eval_batch_count() a batch is all padding."""
        rows = i * self.batch_size + np.arange(self.batch_size)
        return self.rows_batch(rows, rows < len(self.table))
