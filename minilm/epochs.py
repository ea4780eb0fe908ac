"""--epochs N: train for N passes over the training data instead of a number of steps.

A source's plain batches are drawn at random (with replacement), which suits pretraining on more
text than a run reads. A fine-tuning run on a small labelled set wants the other contract: every
row seen exactly N times. A source that can list what it holds says so with two methods,

    epoch_size() -> int              the items in one pass (windows of running text, rows, sentences)
    items(indices) -> batch          the batch of those items, as batch() makes it

and EpochSource reads it in passes: pass e is a permutation of 0 .. n-1 drawn from (seed, e), and
the rows of the run are those permutations laid end to end. Row r of micro-batch m of step s is
at position (s x micro-batches per step + m) x batch_size + r, a pure function of the step like
every other batch, so a resumed run reads exactly what an uninterrupted one would have. Under
torchrun the micro-batch index m runs over every rank's micro-batches, so the ranks share a pass.

The run is ceil(N x n / rows per step) steps, which sets --max_steps (and so the schedule's
length); when n x N is not a multiple of the rows per step, the last step's rows past the end
come from the start of a next pass, so a few items are seen N + 1 times.
"""
from __future__ import annotations

import numpy as np

from minilm.config import auto_warmup
from minilm.data import mix_seed
from minilm.errors import UserError

EPOCH_SALT = 0xE90C   # keeps the pass order's random stream apart from the batches' own (same seed)


class EpochSource:
    """A source read in passes (module docstring); other attributes are the source's."""

    def __init__(self, source, micro_batches_per_step: int, seed: int):
        self.source, self.per_step, self.seed = source, micro_batches_per_step, seed
        self.n = source.epoch_size()
        self.batch_size = source.batch_size
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """Pass `epoch`'s order of the items: a permutation of 0 .. n-1 (the last few kept)."""
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng(mix_seed(self.seed, EPOCH_SALT, epoch))
            self._orders[epoch] = rng.permutation(self.n)
        return self._orders[epoch]

    def indices(self, step: int, micro: int = 0) -> np.ndarray:
        """The items of micro-batch `micro` of `step`, (batch_size,)."""
        positions = (step * self.per_step + micro) * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.n)
        return np.array([self.order(int(e))[k] for e, k in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, step: int, micro: int = 0):
        return self.source.items(self.indices(step, micro))

    def __getattr__(self, name: str):   # only for names not found on self: the source's own
        if name == "source":            # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def steps_for_epochs(epochs: int, n_items: int, rows_per_step: int) -> int:
    """The optimizer steps that read n_items x epochs rows, rows_per_step at a time (rounded up)."""
    return -(-epochs * n_items // rows_per_step)


def read_in_passes(cfg, source, world_size: int, given: set[str], log):
    """With --epochs N: the training source read in passes (EpochSource), and cfg.train.max_steps
    set to the steps of N passes (changed in place, so the schedule, the log and the checkpoints
    follow it). Without it: the source as it is. A --max_steps given beside --epochs (on the
    command line or in --config's file) must agree with it; so must --warmup_steps fit."""
    tc = cfg.train
    if not tc.epochs:
        return source
    if not hasattr(source, "epoch_size"):
        raise UserError(f"--epochs needs data it can list, and --objective {tc.objective} reads "
                        f"{type(source).__name__}, which draws at random: use --max_steps instead")
    micro_batches = tc.grad_accum * world_size
    rows_per_step = tc.batch_size * micro_batches
    n_items = source.epoch_size()
    steps = steps_for_epochs(tc.epochs, n_items, rows_per_step)
    if "max_steps" in given and tc.max_steps != steps:
        raise UserError(f"--epochs {tc.epochs} is {steps} steps on this data ({n_items:,} items / {rows_per_step} "
                        f"rows per step), but --max_steps {tc.max_steps} was given; drop one of them")
    if tc.warmup_steps > steps:
        raise UserError(f"--warmup_steps must be at most the {steps} steps of --epochs {tc.epochs}, got "
                        f"{tc.warmup_steps}; pass --warmup_steps {steps} or less, or more --epochs")
    tc.max_steps = steps
    if tc.warmup_steps < 0:                            # auto: follows the steps now known
        tc.warmup_steps = auto_warmup(steps)
    log(f"--epochs {tc.epochs}: {n_items:,} items per pass, {rows_per_step} per step (batch {tc.batch_size} x "
        f"accumulation {tc.grad_accum} x {world_size} processes): max_steps {steps}")
    return EpochSource(source, micro_batches, tc.seed)
