"""Rows (anchor, positive[, hard negative]) of a table, each text framed `[CLS] text [SEP]`, for
supervised contrastive sentence embeddings (SimCSE's NLI variant, objectives/simcse.py: "pairs"
data).

    --text_field      the anchor's column (default "text")
    --pair_field      the positive's column (required)
    --negative_field  a hard negative's column (optional; a row may leave it empty)

The table is prepared once by rows.prepare_rows (.tsv / .csv with a header, or .jsonl), like
every row source; rows with an empty anchor or positive are skipped and counted there.

    PairSource(folder, "train", seq_len, batch_size).batch(step) -> {
        input_ids   (B, V, seq_len)  V = 2 (anchor, positive) or 3 (+ hard negative) framed texts
        lengths     (B, V)           real tokens of each (an empty hard negative: 2, [CLS] [SEP])
        has_negative (B,) bool       only with a negative column: whether the row has one }

Rows are drawn uniformly with replacement, a pure function of (seed, rank, step, micro); a text
longer than seq_len - 2 tokens keeps its first seq_len - 2.
"""
from __future__ import annotations

import numpy as np
import torch

from minilm.data.blocks import mix_seed
from minilm.data.labelled import readers_of
from minilm.data.rows import RowTable
from minilm.data.sentences import frame_sentences
from minilm.errors import UserError


class PairSource:
    """(anchor, positive[, hard negative]) rows of a prepared table ("pairs" data)."""

    prepares = "rows"

    @classmethod
    def row_columns(cls, data_cfg):
        """([(column, its flag), ...], optional columns, label column) for rows.prepare_rows."""
        if not data_cfg.pair_field:
            raise UserError(f"--objective {readers_of('pairs')} trains on (anchor, positive) rows: pass --pair_field "
                            "naming the positive's column (--text_field names the anchor's, --negative_field an "
                            "optional hard negative's)")
        columns = [(data_cfg.text_field, "--text_field"), (data_cfg.pair_field, "--pair_field")]
        if data_cfg.negative_field:
            columns.append((data_cfg.negative_field, "--negative_field"))
        names = [name for name, _ in columns]
        for i, (name, flag) in enumerate(columns):
            if name in names[:i]:
                other = columns[names.index(name)][1]
                raise UserError(f"{other} and {flag} both name the column {name!r}; an anchor, its positive and "
                                "its hard negative are three different columns")
        return columns, ({data_cfg.negative_field} if data_cfg.negative_field else set()), None

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 log=None, window_length: int | None = None):
        if seq_len < 3:
            raise UserError(f"sentence pairs need --seq_len 3 or more ([CLS] text [SEP]), got {seq_len}")
        self.table = RowTable(folder, split)
        if len(self.table.columns) not in (2, 3):
            raise UserError(f"{folder} holds rows of {len(self.table.columns)} columns, not (anchor, positive[, "
                            "negative]); prepare it again (a fresh --out_dir)")
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.split_id = 0 if split == "train" else 1
        if log is not None:
            columns = " / ".join(self.table.columns)
            log(f"pairs ({split}): {len(self.table):,} rows of {columns}")

    def batch(self, step: int, micro: int = 0) -> dict:
        rng = np.random.default_rng(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        return self.items(rng.integers(0, len(self.table), size=self.batch_size))

    # --epochs (minilm/epochs.py): the rows in an order of its choosing
    def epoch_size(self) -> int:
        return len(self.table)

    def items(self, rows: np.ndarray) -> dict:
        """The batch of the given rows (B,)."""
        views, lengths = [], []
        for column in range(len(self.table.columns)):          # 2 or 3 columns, not a token loop
            ids, length = self.table.cells(rows, column, self.seq_len - 2)
            framed, framed_length = frame_sentences(torch.from_numpy(ids), torch.from_numpy(length), self.seq_len)
            views.append(framed)
            lengths.append(framed_length)
        out = {"input_ids": torch.stack(views, dim=1), "lengths": torch.stack(lengths, dim=1)}
        if len(views) == 3:
            out["has_negative"] = out["lengths"][:, 2] > 2
        return out
