"""Combined objectives ("mlm+sop"): one backbone saved and optimized once, the weighted sum of
losses each normalized by its own counts, metrics per objective, MLM reading sentence pairs, and
the whole thing through the Trainer and train.py."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from minilm.config import Config, ModelConfig, ObjectiveConfig
from minilm.data import SegmentPairSource
from minilm.errors import UserError
from minilm.data import make_source
from minilm.objectives import OBJECTIVES, build_objective, finalize, model_config_for, window_length_for
from minilm.objectives.base import Objective
from minilm.objectives.multitask import common_data
from minilm.tokenizer import CLS_ID, PAD_ID, SEP_ID
from minilm.trainer import Trainer, build_optimizer
from tests.test_cli import TINY, run
from tests.conftest import run_in_process
from tests.test_sop import QUIET, numbered  # noqa: F401  (the module-scoped corpus fixture)
from tests.test_tlm import parallel  # noqa: F401  (the module-scoped prepared translation pairs)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_cfg(vocab_size: int, seq_len: int = 48) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=2, n_head=2, n_embd=32)


def mlm_sop(tokenizer, weights: str = "", seed: int = 0):
    torch.manual_seed(seed)
    return build_objective("mlm+sop", tiny_cfg(tokenizer.vocab_size), tokenizer,
                           ObjectiveConfig(objective_weights=weights))


@pytest.fixture(scope="module")
def pair_batch(numbered):
    _, tokenizer, folder = numbered
    return SegmentPairSource(folder, "train", 48, 16, seed=0, **QUIET).batch(0)


# ----------------------------------------------------------------------------- one backbone
def test_one_backbone_shared_saved_and_optimized_once(numbered):
    _, tokenizer, _ = numbered
    objective = mlm_sop(tokenizer)
    assert objective.data == "segment_pairs" and objective.model_kind == "encoder"
    for part in objective.parts.values():
        assert part.backbone is objective.backbone
    assert objective.backbone.cfg.n_segment == 2           # pairs bring segment embeddings
    keys = list(objective.state_dict())
    backbone_keys = [k for k in keys if k.startswith("backbone.")]
    assert len(backbone_keys) == len(objective.backbone.state_dict())
    assert not any(".backbone." in k for k in keys)        # no second copy under parts.NAME.backbone
    assert {k.split(".")[1] for k in keys if k.startswith("parts.")} == {"mlm", "sop"}
    # every parameter once: the backbone's plus each part's heads
    heads = sum(p.numel() for part in objective.parts.values() for n, p in part.named_parameters())
    assert sum(p.numel() for p in objective.parameters()) == objective.backbone.num_params() + heads
    build_optimizer(objective, Config().train, torch.device("cpu"))   # asserts each parameter in one group
    # a state dict round-trips into a fresh model built from the same config
    fresh = mlm_sop(tokenizer, seed=1)
    assert not torch.equal(fresh.backbone.tok_emb.weight, objective.backbone.tok_emb.weight)
    fresh.load_state_dict(objective.state_dict())
    assert torch.equal(fresh.parts["sop"].backbone.tok_emb.weight, objective.backbone.tok_emb.weight)


# ----------------------------------------------------------------------------- losses and weights
def test_loss_is_the_weighted_sum_each_part_normalized_by_its_own_totals(numbered, pair_batch):
    _, tokenizer, _ = numbered
    objective = mlm_sop(tokenizer, "0.5,3")
    batch = objective.make_batch(pair_batch, torch.Generator().manual_seed(0))
    assert set(batch["counts"]) == {"mlm/targets", "sop/targets"}
    assert int(batch["counts"]["sop/targets"]) == 16 and int(batch["counts"]["mlm/targets"]) > 16
    mlm_loss, _ = objective.parts["mlm"](batch["mlm"])
    sop_loss, _ = objective.parts["sop"](batch["sop"])
    loss, sums = objective(batch)
    torch.testing.assert_close(loss, 0.5 * mlm_loss + 3 * sop_loss)
    # step-wide totals reach each part under its own name: twice the MLM targets, four times the rows
    totals = {"mlm/targets": 2 * batch["counts"]["mlm/targets"], "sop/targets": 4 * batch["counts"]["sop/targets"]}
    torch.testing.assert_close(objective(batch, totals)[0], 0.5 * mlm_loss / 2 + 3 * sop_loss / 4)
    # per-objective metrics, and "loss" is the weighted sum that was trained
    objective.eval()
    metrics = finalize({k: float(v) for k, v in objective(batch)[1].items()})
    for key in ("mlm/loss", "mlm/acc", "mlm/ppl", "sop/loss", "sop/acc", "loss"):
        assert key in metrics, (key, metrics)
    assert metrics["loss"] == pytest.approx(0.5 * metrics["mlm/loss"] + 3 * metrics["sop/loss"], rel=1e-5)
    assert metrics["sop/loss"] == pytest.approx(sop_loss.item(), rel=1e-5)
    assert not any("weighted_nll" in k for k in metrics)


@pytest.mark.parametrize("only", ["mlm", "sop"])
def test_weight_zero_gives_exactly_the_other_objectives_gradient(numbered, pair_batch, only):
    _, tokenizer, _ = numbered
    objective = mlm_sop(tokenizer, "1,0" if only == "mlm" else "0,1")
    batch = objective.make_batch(pair_batch, torch.Generator().manual_seed(0))
    objective(batch)[0].backward()
    combined = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    objective.zero_grad(set_to_none=True)
    objective.parts[only](batch[only])[0].backward()
    alone = {n: p.grad for n, p in objective.named_parameters() if p.grad is not None}
    for name, grad in alone.items():
        assert torch.equal(combined[name], grad), name
    # the other part's heads get nothing, and the backbone's gradient is really the part's
    other = "sop" if only == "mlm" else "mlm"
    assert all(combined.get(n, torch.zeros(1)).abs().max() == 0 for n, _ in objective.named_parameters()
               if n.startswith(f"parts.{other}."))
    assert combined["backbone.tok_emb.weight"].abs().max() > 0


def test_bad_weights_and_combinations_are_one_line_errors(numbered):
    _, tokenizer, _ = numbered
    cfg = tiny_cfg(tokenizer.vocab_size)
    cases = [("mlm+sop", "1,2,3", "3 weight(s) for the 2 objectives"), ("mlm+sop", "1;2", "numbers separated"),
             ("mlm+sop", "1,-1", "not negative"), ("mlm+sop", "0,0", "not all 0"),
             ("sop", "1", "combined objectives"), ("mlm+mlm", "", "twice"), ("mlm+sopp", "", "did you mean sop")]
    for name, weights, message in cases:
        with pytest.raises(UserError, match=re.escape(message)) as err:
            build_objective(name, cfg, tokenizer, ObjectiveConfig(objective_weights=weights))
        assert "\n" not in str(err.value)

    class Rows(Objective):
        name, data = "rows", "labeled_rows"
    with pytest.raises(UserError, match="cannot train on the same batches"):
        common_data([Rows, type(build_objective("sop", cfg, tokenizer))])


PAIRS = [(a, b) for a in OBJECTIVES for b in OBJECTIVES]


@pytest.mark.parametrize("a, b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_pair_of_objectives_trains_or_is_refused_before_any_data_work(numbered, parallel, a, b):
    """What train.py checks before preparing data (model_config_for, window_length_for) either
    refuses a+b in one line, or a+b builds and takes a step on a real batch of its data."""
    name, options = f"{a}+{b}", ObjectiveConfig()
    try:
        cfg = model_config_for(name, tiny_cfg(1024, seq_len=32))
        window = window_length_for(name, cfg, options)
    except UserError as err:
        assert "\n" not in str(err)
        return
    folder = parallel[0] if cfg.n_segment and "tlm" in name else numbered[2]
    vocab = 1024 if folder == parallel[0] else numbered[1].vocab_size
    cfg = model_config_for(name, tiny_cfg(vocab, seq_len=32))
    torch.manual_seed(0)
    objective = build_objective(name, cfg, None, options)
    raw = make_source(objective.data, folder, "train", 32, 4, seed=0, window_length=window, **QUIET).batch(0)
    loss, _ = objective(objective.make_batch(raw, torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in objective.backbone.blocks.parameters())


@pytest.mark.parametrize("name, message", [("plm+sop", "plm reads full windows"), ("mlm+mlm", "twice")])
def test_train_py_refuses_a_combination_before_preparing_data(tmp_path, corpus_dir, name, message):
    out = tmp_path / "run"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--objective", name, *TINY)
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not out.exists()


@pytest.mark.parametrize("name", ["sop", "mlm+sop", "sop+clm"])
def test_a_seq_len_too_short_for_a_sentence_pair_is_refused_before_any_data_work(name):
    cfg = model_config_for(name, tiny_cfg(512, seq_len=4))
    with pytest.raises(UserError, match=r"^sentence pairs \[CLS\] A \[SEP\] B \[SEP\] need --seq_len 5 or more, got 4$"):
        window_length_for(name, cfg, ObjectiveConfig())
    assert window_length_for(name, model_config_for(name, tiny_cfg(512, seq_len=5)), ObjectiveConfig()) == 6


def test_mlm_reads_pairs_and_never_masks_the_frame_or_padding(numbered, pair_batch):
    _, tokenizer, _ = numbered
    objective = mlm_sop(tokenizer)
    batch = objective.make_batch(pair_batch, torch.Generator().manual_seed(0))["mlm"]
    chosen = batch["labels"] != -100
    original = pair_batch["input_ids"]
    frame = (original == CLS_ID) | (original == SEP_ID) | (original == PAD_ID)
    assert chosen.any() and not (chosen & frame).any()
    assert torch.equal(batch["input_ids"][frame], original[frame])        # the frame is left as it is
    assert torch.equal(batch["attn_mask"][:, 0, 0], original != PAD_ID)    # pads hidden from attention
    assert torch.equal(batch["segment_ids"], pair_batch["segment_ids"])


# ----------------------------------------------------------------------------- training
def make_trainer(tmp_path, folder, tokenizer, **train):
    cfg = Config()
    cfg.model = tiny_cfg(tokenizer.vocab_size)
    cfg.train.objective = "mlm+sop"
    cfg.obj.objective_weights = "1,0.5"
    for k, v in dict(out_dir=str(tmp_path), batch_size=8, device="cpu", log_every=4, eval_every=1000,
                     ckpt_every=1000, warmup_steps=2, eval_batches=2, **train).items():
        setattr(cfg.train, k, v)
    torch.manual_seed(0)
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    source = SegmentPairSource(folder, "train", 48, 8, seed=cfg.train.seed, **QUIET)
    val = SegmentPairSource(folder, "val", 48, 8, **QUIET)
    return Trainer(cfg, objective, source, val, tokenizer, log=lambda *_: None)


def test_trainer_reports_per_objective_metrics_and_resumes_exactly(numbered, tmp_path):
    _, tokenizer, folder = numbered
    straight = make_trainer(tmp_path / "a", folder, tokenizer, max_steps=8)
    losses = straight.fit()
    metrics = straight.last_eval
    for key in ("loss", "mlm/loss", "mlm/acc", "sop/loss", "sop/acc"):
        assert key in metrics and metrics[key] == metrics[key], (key, metrics)
    assert metrics["loss"] == pytest.approx(metrics["mlm/loss"] + 0.5 * metrics["sop/loss"], rel=1e-6)
    assert 0 <= metrics["sop/acc"] <= 1
    first = make_trainer(tmp_path / "b", folder, tokenizer, max_steps=8)
    first.fit(until=4)
    second = make_trainer(tmp_path / "b", folder, tokenizer, max_steps=8)
    second.load(os.path.join(tmp_path / "b", "ckpt-00000004.pt"))
    assert second.fit()[-4:] == losses[4:]


def test_train_py_mlm_plus_sop(tmp_path, corpus_dir):
    out = tmp_path / "run"
    result = run("train.py", "--data", corpus_dir, "--out_dir", out, "--objective", "mlm+sop",
                 "--objective_weights", "1,0.5", "--max_steps", 3, "--eval_every", 3, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "segment pairs (train)" in result.stdout
    val_line = next(line for line in result.stdout.splitlines() if "| val" in line)
    for key in ("mlm/loss", "mlm/acc", "sop/loss", "sop/acc"):
        assert key in val_line, val_line
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("val_sop/acc" in r and "val_mlm/loss" in r for r in records)
    # the ALBERT-style encoder fills masks through its MLM part
    fill = run("sample.py", "--ckpt", out, "--fill", "a <mask> b <mask>", "--top_k", 2, "--device", "cpu")
    assert fill.returncode == 0, fill.stderr[-3000:]
    assert fill.stdout.splitlines()[0] == "<mask> 1 of 2:" and fill.stdout.splitlines()[-1].startswith('filled: "a')
    bad = run("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "bad", "--objective", "mlm+sop",
              "--objective_weights", "1", "--max_steps", 1, *TINY)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--objective_weights" in bad.stderr
