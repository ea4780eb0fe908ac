"""Trivial baselines (objectives/base.py, Baseline): every objective declares the predictor that has
learned nothing, evaluation reports baseline_loss and baseline_gap beside the loss (exact on
hand-made batches), and a run still at its baseline past a quarter of its steps says so once, in
one line, where a run that learns stays silent; an --init_from parent that never left its
baseline is named too."""
from __future__ import annotations

import math

import pytest
import torch

from minilm.config import ModelConfig, ObjectiveConfig
from minilm.data import BlockSource, SegmentPairSource, prepare
from minilm.tokenizer import Tokenizer
from minilm.objectives import IGNORE, OBJECTIVES, build_objective, finalize
from minilm.trainer import Trainer, at_baseline, warn_if_parent_learned_nothing
from tests.test_sop import numbered  # noqa: F401  (the module-scoped corpus of numbered sentences)
from tests.test_trainer import make_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_MODEL = dict(vocab_size=400, seq_len=8, n_layer=1, n_head=2, n_embd=16)


def entropy(counts: list[int]) -> float:
    """The entropy of the counts' frequencies plus Miller and Madow's (K - 1) / 2N, K values seen."""
    n, seen = sum(counts), [c for c in counts if c]
    return -sum(c / n * math.log(c / n) for c in seen) + (len(seen) - 1) / (2 * n)


def evaluated(objective, batch) -> dict:
    """finalize of one evaluation batch's sums, with the baseline's, as the trainer adds them."""
    objective.eval()
    with torch.no_grad():
        _, sums = objective(batch)
    sums.update(objective.baseline_sums(batch, sums))
    return finalize({k: float(v) if v.numel() == 1 else v for k, v in sums.items()})


def test_every_objective_declares_a_baseline():
    assert all(cls.baseline is not None for cls in OBJECTIVES.values()), \
        [name for name, cls in OBJECTIVES.items() if cls.baseline is None]


def test_the_unigram_baseline_is_the_entropy_of_the_targets_frequencies_on_a_hand_made_batch():
    torch.manual_seed(0)
    clm = build_objective("clm", ModelConfig(**TINY_MODEL))
    # labels are raw[:, 1:]: targets 305 305 305 307 | 307 309 309 309, one of them padding in the second row
    raw = torch.tensor([[301, 305, 305, 305, 307], [302, 307, 309, 309, 309]])
    batch = clm.make_batch(raw, lengths=torch.tensor([5, 4]))            # row 2's last target is padding
    metrics = evaluated(clm, batch)
    expected = entropy([3, 2, 2])                             # 305 x3, 307 x2, 309 x2 (the pad left out)
    assert expected == pytest.approx(-3 / 7 * math.log(3 / 7) - 4 / 7 * math.log(2 / 7) + 2 / 14)
    assert metrics["baseline_loss"] == pytest.approx(expected, abs=1e-12)
    assert metrics["baseline_gap"] == pytest.approx(expected - metrics["loss"], abs=1e-12)

    mlm = build_objective("mlm", ModelConfig(**TINY_MODEL))
    raw = torch.tensor([[300, 300, 301, 302, 302, 302, 303, 303, 300]] * 4)
    batch = mlm.make_batch(raw, torch.Generator().manual_seed(0))     # the masked tokens are the targets
    counts = [int((batch["targets"] == token).sum()) for token in (300, 301, 302, 303)]
    assert sum(counts) == len(batch["targets"]) > 2
    assert mlm.baseline_sums(batch, {})["target_counts"].shape == (400,)
    assert evaluated(mlm, batch)["baseline_loss"] == pytest.approx(entropy(counts), abs=1e-12)


def test_the_other_baselines_on_hand_made_sums():
    # a binary detector (rtd's discriminator): every token called by the base rate of replaced ones
    metrics = finalize({"discriminator/nll": 30.0, "discriminator/targets": 100.0, "discriminator/positives": 10.0,
                        "discriminator/true_positives": 0.0, "discriminator/predicted_positives": 0.0})
    assert metrics["discriminator/baseline_loss"] == pytest.approx(entropy([90, 10]), abs=1e-12)
    assert metrics["discriminator/baseline_gap"] == pytest.approx(entropy([90, 10]) - 0.3, abs=1e-12)
    # simcse: a uniform guess among a batch's 4 keys is ln 4 per row
    simcse = build_objective("simcse", ModelConfig(**TINY_MODEL))
    batch = {"input_ids": torch.full((4, 2, 8), 300), "counts": {"targets": torch.tensor(4)}}
    assert finalize({"nll": 1.0, "targets": 4.0, **simcse.baseline_sums(batch, {})})["baseline_loss"] == \
        pytest.approx(math.log(4))
    # classify: the label prior over its own labels, whatever the vocabulary
    classify = build_objective("classify", ModelConfig(**TINY_MODEL), None,
                               ObjectiveConfig(labels='["a", "b", "c"]'))
    batch = {"labels": torch.tensor([0, 0, 0, 2, IGNORE])}
    counts = classify.baseline_sums(batch, {})["target_counts"]
    assert counts.tolist() == [3, 0, 1]
    assert finalize({"nll": 1.0, "targets": 4.0, "target_counts": counts})["baseline_loss"] == \
        pytest.approx(entropy([3, 1]))


def test_each_part_of_a_combination_reports_its_own_gap(numbered):
    _, tokenizer, folder = numbered
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=48, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    objective = build_objective("mlm+sop", cfg, tokenizer)
    objective.eval()
    raw = SegmentPairSource(folder, "train", 48, 16, seed=0, log=None).batch(0)
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    metrics = evaluated(objective, batch)
    labels = batch["sop"]["labels"]
    assert metrics["sop/baseline_loss"] == pytest.approx(entropy(torch.bincount(labels, minlength=2).tolist()))
    assert metrics["mlm/baseline_loss"] == pytest.approx(entropy(torch.bincount(batch["mlm"]["targets"]).tolist()))
    assert "baseline_gap" not in metrics and {"mlm/baseline_gap", "sop/baseline_gap"} <= set(metrics)
    # the check names the part that is stuck, by its own margin
    stuck = {**metrics, "mlm/baseline_gap": 1.0, "sop/baseline_gap": 0.001}
    assert len(at_baseline("mlm+sop", stuck)) == 1 and at_baseline("mlm+sop", stuck)[0].startswith("sop is still")


@pytest.fixture(scope="module")
def small_vocabulary(tmp_path_factory, texts, corpus_dir):
    """The built-in corpus with a 512-piece tokenizer, so that a tiny model leaves the unigram
    within seconds: (tokenizer, prepared folder)."""
    tokenizer = Tokenizer.train(texts, vocab_size=512)
    folder = str(tmp_path_factory.mktemp("prepared512"))
    prepare(corpus_dir, tokenizer, folder, val_fraction=0.1, num_workers=1, log=lambda *_: None)
    return tokenizer, folder


def run_with_lr(tmp_path, small_vocabulary, lr: float, max_steps: int) -> list[str]:
    """A tiny causal LM on the built-in corpus, evaluated 3 times: the lines it logged."""
    tokenizer, folder = small_vocabulary
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=max_steps, lr=lr, min_lr=lr / 10, warmup_steps=10,
                      eval_every=max_steps // 3, eval_batches=4, log_every=max_steps // 3, batch_size=16)
    cfg.model.seq_len = 64
    torch.manual_seed(0)
    objective = build_objective("clm", cfg.model, tokenizer, cfg.obj)
    lines: list[str] = []
    trainer = Trainer(cfg, objective, BlockSource(folder, "train", 64, 16), BlockSource(folder, "val", 64, 16),
                      tokenizer, log=lines.append)
    trainer.peak_flops = 1e12
    trainer.fit()
    return lines


def test_a_run_that_cannot_learn_warns_once_and_one_that_learns_stays_silent(tmp_path, small_vocabulary):
    stuck = run_with_lr(tmp_path / "stuck", small_vocabulary, lr=0.0, max_steps=30)
    warnings = [line for line in stuck if line.startswith("warning:")]
    assert len(warnings) == 1 and "\n" not in warnings[0], stuck
    assert warnings[0].startswith("warning: step 10 of 30: clm is still at its trivial baseline (each next token "
                                  "predicted by its unigram frequency)") and "--lr (now 0)" in warnings[0]
    learning = run_with_lr(tmp_path / "learning", small_vocabulary, lr=3e-3, max_steps=120)
    assert not [line for line in learning if line.startswith("warning:")], learning
    gaps = [float(line.split("baseline_gap ")[1].split()[0]) for line in learning if "baseline_gap" in line]
    assert len(gaps) == 3 and min(gaps) > 0.2, learning


def test_an_init_from_parent_still_at_its_baseline_is_named(tmp_path):
    lines: list[str] = []
    parent = {"objective": "rtd", "step": 1500, "config": {},
              "last_eval": {"discriminator/loss": 0.340, "discriminator/baseline_loss": 0.348,
                            "discriminator/baseline_gap": 0.008, "generator/loss": 4.0}}
    warn_if_parent_learned_nothing(parent, "parent.pt", lines.append)
    assert len(lines) == 1 and lines[0].startswith("warning: --init_from parent.pt: at its last evaluation (step 1500)")
    assert "rtd discriminator is still at its trivial baseline" in lines[0] and "--embedding_sharing gdes" in lines[0]
    parent["last_eval"]["discriminator/baseline_gap"] = 0.1
    warn_if_parent_learned_nothing(parent, "parent.pt", lines.append)
    assert len(lines) == 1
