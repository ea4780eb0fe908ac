"""--epochs N: N passes over the training data (minilm/epochs.py): every window of running text, or
every labelled row, is seen N times, and max_steps (the schedule's length) follows from the data."""
from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from minilm.checkpoint import load_checkpoint
from minilm.config import Config
from minilm.data import BlockSource, LabelledSource, prepare_rows
from minilm.epochs import EpochSource, read_in_passes, steps_for_epochs
from minilm.errors import UserError
from minilm.objectives import build_objective
from minilm.trainer import Trainer
from tests.conftest import run_in_process
from tests.test_classify import write_labelled
from tests.test_cli import TINY, assert_user_error
from tests.test_trainer import make_config

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")


def counting(source) -> collections.Counter:
    """How often each item of `source` is read, recorded as a run reads them."""
    seen, items = collections.Counter(), source.items

    def recorded(indices):
        seen.update(np.asarray(indices).tolist())
        return items(indices)
    source.items = recorded
    return seen


def test_a_run_of_two_epochs_reads_every_window_twice(tmp_path, prepared, tokenizer):
    """The trainer's real loop over running text, 2 passes, batch 8 x accumulation 2: each window
    of the tiled stream is read twice, and only the last step's overflow (the next pass's first
    items) a third time."""
    folder, meta = prepared
    cfg = make_config(tmp_path, tokenizer.vocab_size, epochs=2, grad_accum=2)
    # the small split of the prepared corpus stands for the training data: ~120 windows
    source = BlockSource(folder, "val", 32, cfg.train.batch_size, seed=cfg.train.seed)
    n = source.epoch_size()
    assert n == (meta["val_tokens"] - 33) // 32 + 1              # windows of 33 tokens, 32 apart
    seen = counting(source)
    lines = []
    epochs_source = read_in_passes(cfg, source, 1, set(), lines.append)
    steps = cfg.train.max_steps
    assert steps == -(-2 * n // 16) and f"--epochs 2: {n:,} items per pass, 16 per step" in lines[0]
    objective = build_objective("clm", cfg.model, tokenizer, cfg.obj)
    trainer = Trainer(cfg, objective, epochs_source, None, tokenizer, log=lambda *_: None)
    trainer.fit()
    assert trainer.step == steps
    extra = steps * 16 - 2 * n                                   # rows past the end of the second pass
    assert 0 <= extra < 16
    assert sum(seen.values()) == steps * 16
    assert set(seen) == set(range(n))
    assert sorted(i for i, c in seen.items() if c == 3) == sorted(epochs_source.order(2)[:extra].tolist())
    assert all(c == 2 for i, c in seen.items() if i not in set(epochs_source.order(2)[:extra].tolist()))


def test_the_windows_tile_the_token_stream(prepared):
    folder, meta = prepared
    source = BlockSource(folder, "train", 32, 4)
    tokens = np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r")
    n = source.epoch_size()
    windows = source.items(np.arange(n)).numpy()                # (n, 33)
    assert windows.shape == (n, 33)
    assert (windows[:, :-1].reshape(-1) == tokens[:n * 32]).all()  # each window's inputs follow the last's
    assert (windows[:-1, -1] == windows[1:, 0]).all()             # a window's last token starts the next
    assert n * 32 + 1 <= len(tokens) < (n + 1) * 32 + 1           # only a tail shorter than a window is left


def test_every_labelled_row_is_seen_n_times_in_the_order_of_each_pass(tmp_path, tokenizer):
    """Labelled rows, 3 passes, 24 rows in batches of 8 (no remainder): each row exactly 3 times,
    each pass a different order, each step's batch a pure function of the step (resume)."""
    data = str(tmp_path / "data")
    meta = prepare_rows(write_labelled(tmp_path / "train.tsv", 24, 0), tokenizer, data,
                        columns=[("text", "--text_field")], label_column="label",
                        val_source=write_labelled(tmp_path / "val.tsv", 6, 1), num_workers=1, log=lambda _: None)
    cfg = make_config(tmp_path, tokenizer.vocab_size, objective="classify", epochs=3, warmup_steps=1)
    cfg.obj.labels = json.dumps(meta["labels"])
    source = LabelledSource(data, "train", 32, 8)
    seen = counting(source)
    epochs_source = read_in_passes(cfg, source, 1, set(), lambda _: None)
    assert cfg.train.max_steps == 9
    rows_of_steps = [epochs_source.batch(step)["rows"].tolist() for step in range(9)]
    assert seen == {row: 3 for row in range(24)}
    passes = [sorted(sum(rows_of_steps[3 * e:3 * e + 3], [])) for e in range(3)]
    assert passes == [list(range(24))] * 3
    assert rows_of_steps[0:3] != rows_of_steps[3:6]             # reshuffled each pass
    again = EpochSource(LabelledSource(data, "train", 32, 8), 1, cfg.train.seed)
    assert again.batch(7)["rows"].tolist() == rows_of_steps[7]   # the same rows at the same step
    # and the trainer runs it to the end
    objective = build_objective("classify", cfg.model, tokenizer, cfg.obj)
    trainer = Trainer(cfg, objective, epochs_source, None, tokenizer, log=lambda *_: None)
    trainer.fit()
    assert trainer.step == 9 and seen == {row: 6 for row in range(24)}


def test_ranks_and_accumulation_share_one_pass():
    """Micro-batch m of a step (m counting every rank's micro-batches) takes the next batch_size
    items of the pass: 2 ranks x accumulation 2 x batch 3 over 12 items is one pass per step."""
    class Items:
        batch_size = 3

        def epoch_size(self):
            return 12

        def items(self, indices):
            return indices
    source = EpochSource(Items(), micro_batches_per_step=4, seed=0)
    step0 = np.concatenate([source.batch(0, m) for m in range(4)])
    assert sorted(step0.tolist()) == list(range(12))
    assert step0.tolist() == source.order(0).tolist()
    assert steps_for_epochs(5, 12, 12) == 5 and steps_for_epochs(1, 13, 12) == 2


def test_epochs_and_max_steps_must_agree(prepared, tmp_path, tokenizer):
    folder, _ = prepared
    cfg = make_config(tmp_path, tokenizer.vocab_size, epochs=1, max_steps=5)
    source = BlockSource(folder, "train", 32, 8)
    with pytest.raises(UserError, match=r"--epochs 1 is \d+ steps on this data .* but --max_steps 5 was given"):
        read_in_passes(cfg, source, 1, {"max_steps"}, lambda _: None)
    steps = steps_for_epochs(1, source.epoch_size(), 8)
    cfg.train.max_steps = steps
    assert isinstance(read_in_passes(cfg, source, 1, {"max_steps"}, lambda _: None), EpochSource)
    cfg = make_config(tmp_path, tokenizer.vocab_size, epochs=1, warmup_steps=10 ** 6)
    with pytest.raises(UserError, match=r"--warmup_steps must be at most the \d+ steps of --epochs 1"):
        read_in_passes(cfg, source, 1, set(), lambda _: None)
    Config().train.validate()   # and --epochs alone passes the parse-time checks, whatever max_steps says
    cfg = Config()
    cfg.train.epochs, cfg.train.warmup_steps, cfg.train.max_steps = 2, 700, 600
    cfg.train.validate()


def test_train_py_epochs_sets_max_steps_and_the_checkpoint_keeps_it(tmp_path, corpus_dir):
    out = tmp_path / "out"
    result = run_in_process("train.py", *TINY, "--data", corpus_dir, "--out_dir", out, "--epochs", 1,
                            "--seq_len", 256, "--batch_size", 32, "--eval_every", 1000)
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("--epochs 1:"))
    steps = int(line.rsplit("max_steps ", 1)[1])
    ckpt = load_checkpoint(str(out / f"ckpt-{steps:08d}.pt"), map_location="cpu")
    assert ckpt["step"] == steps and ckpt["config"]["train"]["max_steps"] == steps
    assert ckpt["config"]["train"]["epochs"] == 1


def test_train_py_refuses_disagreeing_epochs_and_max_steps(tmp_path, corpus_dir):
    result = run_in_process("train.py", *TINY, "--data", corpus_dir, "--out_dir", tmp_path / "out", "--epochs", 1,
                            "--max_steps", 3)
    assert_user_error(result, "--epochs 1 is", "but --max_steps 3 was given; drop one of them")


def test_a_source_drawn_at_random_refuses_epochs(tmp_path, prepared, tokenizer):
    """Sentence pairs (sop) and translations are made at random per batch: no list to pass over."""
    from minilm.data import SegmentPairSource
    folder, _ = prepared
    cfg = make_config(tmp_path, tokenizer.vocab_size, epochs=1, objective="sop")
    source = SegmentPairSource(folder, "train", 32, 4, tokenizer=tokenizer)
    with pytest.raises(UserError, match="--epochs needs data it can list, and --objective sop reads "
                                        "SegmentPairSource, which draws at random: use --max_steps instead"):
        read_in_passes(cfg, source, 1, set(), lambda _: None)
