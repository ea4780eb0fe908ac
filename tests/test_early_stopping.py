"""--early_stopping_patience N: the run stops when the watched validation metric (the objective's
best_metric, else the val loss) has not improved for N evaluations; the last checkpoint and
best.pt stay, the log says why, and the count survives --resume (minilm/trainer.py)."""
from __future__ import annotations

import os

import pytest

from minilm.checkpoint import load_checkpoint
from tests.conftest import run_in_process
from tests.test_cli import TINY
from tests.test_trainer import make_config, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")

# an lr so small that AdamW's update (lr x about 1, and lr x weight_decay x w) is below a float32
# weight's rounding step: the weights never change, so every evaluation gives the same numbers
# (--lr must be > 0, so this stands for lr 0)
FROZEN_LR = dict(lr=1e-30, min_lr=0.0)


def counting_evaluations(trainer) -> list:
    """The steps at which trainer evaluates, recorded as it runs."""
    steps, evaluate = [], trainer.evaluate

    def counted():
        steps.append(trainer.step)
        return evaluate()
    trainer.evaluate = counted
    return steps


def test_a_run_that_learns_nothing_stops_after_patience_plus_one_evaluations(tmp_path, prepared, tokenizer):
    lines = []
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=40, eval_every=2, eval_batches=2,
                      early_stopping_patience=3, **FROZEN_LR)
    trainer = make_trainer(cfg, prepared, tokenizer, val=True)
    trainer.log = lines.append
    evaluations = counting_evaluations(trainer)
    trainer.fit()
    # the first evaluation sets the best, the next 3 do not beat it: 4 evaluations, at steps 2..8
    assert evaluations == [2, 4, 6, 8]
    assert trainer.step == 8 and len(trainer.history) == 8
    assert trainer.evals_without_improvement == 3
    # the last checkpoint and the best (the first evaluation's) stay
    assert load_checkpoint(os.path.join(tmp_path, "ckpt-00000008.pt"))["step"] == 8
    best = load_checkpoint(os.path.join(tmp_path, "best.pt"))
    assert best["step"] == 2 and best["last_eval"]["loss"] == trainer.best_value
    said = [line for line in lines if "stopping early" in line]
    assert len(said) == 1 and "val loss has not improved" in said[0] and "--early_stopping_patience 3" in said[0]


def test_a_learning_run_does_not_stop_early(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=40, eval_every=8, eval_batches=4,
                      early_stopping_patience=2, lr=3e-3, min_lr=3e-4)
    trainer = make_trainer(cfg, prepared, tokenizer, val=True)
    evaluations = counting_evaluations(trainer)
    trainer.fit()
    assert evaluations == [8, 16, 24, 32, 40] and trainer.step == 40
    assert trainer.stopped_early is None and trainer.evals_without_improvement < 2


def test_without_patience_nothing_stops(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=10, eval_every=2, eval_batches=1, **FROZEN_LR)
    trainer = make_trainer(cfg, prepared, tokenizer, val=True)
    trainer.fit()
    assert trainer.step == 10 and trainer.stopped_early is None
    assert not os.path.exists(os.path.join(tmp_path, "best.pt"))   # no metric is watched: as before


def test_the_count_survives_resume(tmp_path, prepared, tokenizer):
    """Stopped at step 4 (one evaluation without improvement), resumed: it stops at step 8, as the
    run that never stopped did; resumed again, an early-stopped run trains no further step."""
    def trainer_for(out):
        cfg = make_config(out, tokenizer.vocab_size, max_steps=40, eval_every=2, eval_batches=2,
                          early_stopping_patience=3, **FROZEN_LR)
        return make_trainer(cfg, prepared, tokenizer, val=True)

    first = trainer_for(tmp_path)
    first.fit(until=4)
    assert first.evals_without_improvement == 1
    second = trainer_for(tmp_path)
    second.load(os.path.join(tmp_path, "ckpt-00000004.pt"))
    assert second.evals_without_improvement == 1 and second.best_value == first.best_value
    evaluations = counting_evaluations(second)
    second.fit()
    assert evaluations == [6, 8] and second.step == 8 and second.stopped_early

    third = trainer_for(tmp_path)
    third.load(os.path.join(tmp_path, "ckpt-00000008.pt"))
    lines = []
    third.log = lines.append
    third.fit()
    assert third.step == 8 and third.history == [] and third.stopped_early
    assert any("this run stopped early" in line for line in lines)


def test_the_watched_metric_and_its_direction(tmp_path, prepared, tokenizer):
    """A best_metric (classify's macro_f1) improves upwards; the val loss downwards; a tie is no
    improvement."""
    cfg = make_config(tmp_path, tokenizer.vocab_size, early_stopping_patience=2)
    trainer = make_trainer(cfg, prepared, tokenizer, val=True)
    trainer.save = lambda: None
    assert trainer.watched_metric() == ("loss", False)
    outcomes = []
    for loss in (3.0, 2.5, 2.5, 2.7, 2.4, 2.6):
        trainer.last_eval = {"loss": loss}
        outcomes.append((trainer.keep_best(), trainer.evals_without_improvement))
    assert outcomes == [(True, 0), (True, 0), (False, 1), (False, 2), (True, 0), (False, 1)]
    assert trainer.best_value == 2.4

    trainer.objective.best_metric = "macro_f1"
    trainer.best_value, trainer.evals_without_improvement = None, 0
    assert trainer.watched_metric() == ("macro_f1", True)
    outcomes = []
    for f1 in (0.2, 0.5, 0.4, 0.5, 0.6):
        trainer.last_eval = {"loss": 1.0, "macro_f1": f1}
        outcomes.append(trainer.keep_best())
    assert outcomes == [True, True, False, False, True] and trainer.best_value == 0.6


def test_train_py_says_why_it_stopped(tmp_path, corpus_dir):
    out = tmp_path / "out"
    result = run_in_process("train.py", *TINY, "--data", corpus_dir, "--out_dir", out, "--max_steps", 30,
                            "--eval_every", 2, "--early_stopping_patience", 2, "--lr", "1e-30", "--min_lr", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| stopping early: val loss has not improved on its best" in result.stdout
    assert os.path.exists(out / "ckpt-00000006.pt") and os.path.exists(out / "best.pt")
    assert not os.path.exists(out / "ckpt-00000030.pt")
