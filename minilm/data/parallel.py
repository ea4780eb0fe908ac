"""A parallel corpus, one translation pair per row, laid out as XLM's translation LM reads it
("parallel" data; objectives/tlm.py).

    ParallelSource(folder, "train", seq_len, batch_size).batch(step) -> {
        input_ids     (B, T)  <eos> source <eos> <eos> target <eos> <pad>...
        position_ids  (B, T)  0 .. a+1 over the source half, 0 .. b+1 again over the target half
        segment_ids   (B, T)  the language of each token: 0 (--text_field's) on the source half,
                              1 (--pair_field's) on the target half, 0 on padding
        lengths       (B,)    real tokens per row, a + b + 4
        source_lengths, target_lengths (B,)  a and b, the tokens kept of each side
        rows          (B,)    the table row each pair comes from
        monolingual   {input_ids, segment_ids, lengths}: one side per row, <eos> x <eos> <pad>...,
                      for the masked LM part of --objective mlm+tlm (below)
    }

The layout is XLM's (facebookresearch/XLM, utils.py concat_batches): each sentence between two
end-of-sentence tokens, </s> x1 </s> </s> x2 </s>, here minilm's <eos>; so each side looks as a
document looks inside minilm's monolingual token stream (<eos> before and after it). The positions
restart at 0 where the target half begins (its opening <eos>), so a word and its translation sit
at similar positions, and the language ids tell the halves apart. The four <eos> are special:
never masked, never predicted (masking.eligible_positions); nor is padding (lengths).

Languages: one id per language, the column's: the two language codes are the column names
(--text_field, --pair_field), language 0 and language 1, named by the reserved tags <lang_0> and
<lang_1> (tokenizer.LANG_IDS). The model reads them through its segment embeddings, which are
XLM's language embeddings under another name (objectives/tlm.py says why one table serves both).

A pair longer than the context (a + b > seq_len - 4) is cut on both sides in proportion, at each
side's end, never dropping a side: truncate_in_proportion.

Monolingual rows (mlm+tlm): XLM trains MLM on monolingual streams alongside TLM. Here the masked LM
part reads the same prepared rows, one side at a time: each row of `monolingual` is one side of an
independently drawn pair (side and row uniform), <eos> x <eos>, with that side's language id, so one
prepared folder serves both parts. Sentences are short, so these rows are mostly padding (XLM packs
sentences into 256-token streams instead; a cost in throughput, not in correctness).

batch(step, micro) is a pure function of (seed, rank, step, micro), like the other sources.
"""
from __future__ import annotations

import numpy as np
import torch

from minilm.data.blocks import mix_seed
from minilm.data.rows import RowTable
from minilm.errors import UserError
from minilm.tokenizer import EOS_ID, PAD_ID

SEPARATORS = 4   # <eos> source <eos> <eos> target <eos>


def truncate_in_proportion(a_len: np.ndarray, b_len: np.ndarray, budget: int):
    """Lengths (a', b') to keep of two sides so that a' + b' <= budget, cutting both in proportion.

    Pairs that fit are kept whole. A pair that does not (a + b > budget) fills the budget exactly:
    a' = floor(budget * a / (a + b)), at least 1, and b' = budget - a'. So each side keeps its share
    of the budget, the source rounded down and the target taking the remainder, and a side of one
    token or more never drops to 0 (needs budget >= 2). b' <= b always holds (the floor gives the
    source at most its share, the target less than its share + 1). Arrays in, arrays out."""
    a_len, b_len = np.asarray(a_len, dtype=np.int64), np.asarray(b_len, dtype=np.int64)
    fits = a_len + b_len <= budget
    share = np.maximum(budget * a_len // np.maximum(a_len + b_len, 1), np.minimum(a_len, 1))
    return np.where(fits, a_len, share), np.where(fits, b_len, budget - share)


def pack_translation(source: torch.Tensor, source_len: torch.Tensor, target: torch.Tensor,
                     target_len: torch.Tensor, seq_len: int) -> dict:
    """Rows <eos> S <eos> <eos> T <eos> <pad>... from two padded id tensors.

    source (B, Ws), target (B, Wt): each row's tokens first (what RowTable.cells reads); source_len,
    target_len (B,): how many of them to keep, source_len + target_len <= seq_len - 4. One gather
    per side, no loop. Returns input_ids, position_ids, segment_ids (B, seq_len) and lengths (B,),
    as the module docstring says."""
    t = torch.arange(seq_len)[None, :]                                   # (1, T)
    a, b = source_len[:, None], target_len[:, None]                      # (B, 1)
    in_source = (t >= 1) & (t <= a)
    in_target = (t >= a + 3) & (t <= a + b + 2)
    lengths = source_len + target_len + SEPARATORS
    from_source = source.gather(1, (t - 1).clamp(0, source.shape[1] - 1).expand(len(source), -1))
    from_target = target.gather(1, (t - a - 3).clamp(0, target.shape[1] - 1))
    ids = torch.where(in_source, from_source, torch.where(in_target, from_target, EOS_ID))
    real = t < lengths[:, None]
    target_half = (t >= a + 2) & real                                    # from the target's opening <eos>
    return {"input_ids": torch.where(real, ids, PAD_ID),
            "position_ids": torch.where(target_half, t - a - 2, t),
            "segment_ids": target_half.long(),
            "lengths": lengths}


def pack_monolingual(ids: torch.Tensor, length: torch.Tensor, language: torch.Tensor, seq_len: int) -> dict:
    """Rows <eos> X <eos> <pad>... of one side each: ids (B, W) with length (B,) <= seq_len - 2 kept,
    language (B,) the side's language id. Returns input_ids, segment_ids (B, seq_len), lengths (B,)."""
    t = torch.arange(seq_len)[None, :]
    n = length[:, None]
    inner = ids.gather(1, (t - 1).clamp(0, ids.shape[1] - 1).expand(len(ids), -1))
    lengths = length + 2
    real = t < lengths[:, None]
    input_ids = torch.where((t >= 1) & (t <= n), inner, EOS_ID)
    return {"input_ids": torch.where(real, input_ids, PAD_ID),
            "segment_ids": torch.where(real, language[:, None], 0),
            "lengths": lengths}


class ParallelSource:
    """Translation pairs from rows prepared by rows.prepare_rows (module docstring)."""

    prepares = "rows"

    @classmethod
    def row_columns(cls, data_cfg):
        """The columns train.py prepares: the source text (--text_field) and its translation
        (--pair_field), both required; no label."""
        if not data_cfg.pair_field.strip():
            raise UserError("parallel data needs --pair_field: the column (or JSON field) holding each row's "
                            "translation, with --text_field naming the source, e.g. --text_field en --pair_field fr")
        if data_cfg.pair_field == data_cfg.text_field:
            raise UserError(f"--pair_field and --text_field both name {data_cfg.text_field!r}; a translation pair "
                            "needs two columns, e.g. --text_field en --pair_field fr")
        return [(data_cfg.text_field, "--text_field"), (data_cfg.pair_field, "--pair_field")], set(), None

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 log=None, window_length: int | None = None):
        if seq_len < SEPARATORS + 2:
            raise UserError(f"translation pairs need --seq_len {SEPARATORS + 2} or more "
                            f"(<eos> source <eos> <eos> target <eos>), got {seq_len}")
        self.table = RowTable(folder, split)
        if len(self.table.columns) != 2:
            raise UserError(f"{folder} holds rows of {len(self.table.columns)} column(s), not translation pairs; "
                            "prepare it again (a fresh --out_dir)")
        self.languages = tuple(self.table.columns)     # language 0, language 1: the column names
        self.seq_len, self.batch_size, self.seed, self.rank = seq_len, batch_size, seed, rank
        self.split_id = 0 if split == "train" else 1
        if log is not None:
            lengths = self.table.lengths
            cut = int((lengths.sum(axis=1) > seq_len - SEPARATORS).sum())
            log(f"parallel ({split}): {len(self.table):,} pairs, languages {self.languages[0]} (id 0, <lang_0>) "
                f"and {self.languages[1]} (id 1, <lang_1>)"
                + (f"; {cut:,} pairs longer than --seq_len {seq_len} are cut on both sides in proportion" if cut else ""))

    def batch(self, step: int, micro: int = 0) -> dict:
        rng = np.random.default_rng(mix_seed(self.seed, self.rank, self.split_id, step, micro))
        B, budget = self.batch_size, self.seq_len - SEPARATORS
        rows = rng.integers(0, len(self.table), size=B)
        source, _ = self.table.cells(rows, 0, budget)
        target, _ = self.table.cells(rows, 1, budget)
        source_len, target_len = truncate_in_proportion(self.table.lengths[rows, 0], self.table.lengths[rows, 1],
                                                        budget)
        batch = pack_translation(torch.from_numpy(source), torch.from_numpy(source_len),
                                 torch.from_numpy(target), torch.from_numpy(target_len), self.seq_len)
        batch.update(source_lengths=torch.from_numpy(source_len), target_lengths=torch.from_numpy(target_len),
                     rows=torch.from_numpy(rows))
        batch["monolingual"] = self.monolingual(rng)
        return batch

    def monolingual(self, rng: np.random.Generator) -> dict:
        """One side of a random pair per row (module docstring), cut at seq_len - 2 tokens."""
        rows = rng.integers(0, len(self.table), size=self.batch_size)
        side = rng.integers(0, 2, size=self.batch_size)
        width = self.seq_len - 2
        first, first_len = self.table.cells(rows, 0, width)
        second, second_len = self.table.cells(rows, 1, width)
        ids = np.where(side[:, None] == 1, second, first)
        length = np.where(side == 1, second_len, first_len)
        return pack_monolingual(torch.from_numpy(ids), torch.from_numpy(length), torch.from_numpy(side), self.seq_len)
