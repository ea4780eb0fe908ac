"""Random windows of a token stream: the source of causal LM, masked LM, t5 and the other
objectives that read running text ("blocks" data).

    BlockSource(folder, "train", seq_len, batch_size).batch(step) -> LongTensor (batch_size, window_length)
"""
from __future__ import annotations

import os

import numpy as np
import torch

from minilm.data.preparation import load_meta
from minilm.errors import UserError


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

    prepares = "documents"   # the preparation it reads: running text (minilm/data/preparation.py)

    def __init__(self, folder: str, split: str, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 log=None, window_length: int | None = None):
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
        return self.windows(starts)

    def windows(self, starts: np.ndarray) -> torch.Tensor:
        """The windows starting at token offsets `starts` (B,): one fancy-index read of (B, 1) + (1, window)."""
        idx = starts[:, None] + np.arange(self.window_length)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    # --------------------------------------------------------------- --epochs: the stream as a list of windows
    # Window i starts at token i x (window_length - 1): consecutive windows share one token, the
    # last one's target, so a causal LM predicts every token of the stream once per pass.
    def epoch_size(self) -> int:
        """Windows in one pass over the split (the tail shorter than a window is left out)."""
        return (len(self.tokens) - self.window_length) // (self.window_length - 1) + 1

    def items(self, indices: np.ndarray) -> torch.Tensor:
        """The windows of the given indices (B,) of one pass, (B, window_length)."""
        return self.windows(np.asarray(indices, dtype=np.int64) * (self.window_length - 1))


