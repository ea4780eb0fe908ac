"""Causal LM labels: shifted by one, masked by position (padding), never by token id, and the
optional drop of the target right after a document boundary."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minilm.config import ModelConfig, ObjectiveConfig
from minilm.objectives.base import IGNORE
from minilm.objectives.clm import CausalLM, causal_labels
from minilm.tokenizer import EOS_ID, NUM_SPECIAL


def test_labels_are_the_next_token_everywhere():
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(NUM_SPECIAL, 500, (4, 33), generator=g)
    input_ids, labels = causal_labels(raw)
    assert torch.equal(input_ids, raw[:, :-1])
    assert torch.equal(labels, raw[:, 1:])


def test_padding_is_masked_by_position_and_eos_targets_are_kept_when_pad_equals_eos():
    # the transformers #23530 trap: rows padded *with the eos id*. Only the lengths may say
    # what is padding; the real <eos> tokens inside the rows must stay targets.
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(NUM_SPECIAL, 500, (3, 17), generator=g)
    raw[:, 5] = EOS_ID                                  # a real document end inside every row
    lengths = torch.tensor([17, 12, 7])
    for row, n in enumerate(lengths.tolist()):
        raw[row, n:] = EOS_ID                           # pad == eos
    _, labels = causal_labels(raw, lengths)
    for row, n in enumerate(lengths.tolist()):
        # target t is real exactly when t + 1 < length
        assert (labels[row, : n - 1] != IGNORE).all()
        assert (labels[row, n - 1:] == IGNORE).all()
        assert torch.equal(labels[row, : n - 1], raw[row, 1:n])
    assert (labels[:, 4] == EOS_ID).all()               # the real <eos> is predicted in every row


def test_predict_after_eos_false_drops_only_the_targets_that_read_eos():
    g = torch.Generator().manual_seed(2)
    raw = torch.randint(NUM_SPECIAL, 500, (8, 65), generator=g)
    raw[torch.rand(raw.shape, generator=g) < 0.05] = EOS_ID
    _, kept = causal_labels(raw)
    input_ids, dropped = causal_labels(raw, predict_after_eos=False)
    reads_eos = input_ids == EOS_ID
    assert reads_eos.any()
    assert (dropped[reads_eos] == IGNORE).all()
    assert torch.equal(dropped[~reads_eos], kept[~reads_eos])
    assert (dropped == EOS_ID).sum() == (kept == EOS_ID).sum() - (reads_eos & (kept == EOS_ID)).sum()


def test_loss_is_the_mean_cross_entropy_over_real_targets():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, seq_len=16, n_layer=1, n_head=2, n_embd=32)
    objective = CausalLM(cfg, None, ObjectiveConfig(predict_after_eos=False))
    raw = torch.randint(NUM_SPECIAL, 300, (4, 17))
    raw[:, 8] = EOS_ID
    lengths = torch.tensor([17, 15, 10, 4])
    batch = objective.make_batch(raw, lengths=lengths)
    loss, sums = objective(batch)
    logits = objective.backbone.logits(objective.backbone(batch["input_ids"]))
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # 16 + 14 + 9 + 3 real targets, minus the rows' targets after <eos> at position 8 (rows 0-2)
    assert int(sums["targets"]) == 16 + 14 + 9 + 3 - 3


# ----------------------------------------------------------------------------- the speedrun's defaults
def test_clm_defaults_to_muon_wsd_and_qk_norm_and_every_flag_or_arch_wins():
    """clm.py's `defaults` (issue 21's measured gains) where the command line leaves the flags out;
    --arch states qk_norm (llama, gpt2: off), so an arch is never undone; the other objectives keep
    TrainConfig's and ModelConfig's values. A default the flags cannot live with is named."""
    import dataclasses

    from minilm.config import ModelConfig, TrainConfig, explicit_flags
    from minilm.errors import UserError
    from minilm.objectives import model_defaults_for, train_defaults_for
    chosen = train_defaults_for("clm", TrainConfig(), set())
    assert (chosen.optimizer, chosen.schedule) == ("muon", "wsd")
    assert model_defaults_for("clm", ModelConfig(), set()).qk_norm is True
    given = train_defaults_for("clm", dataclasses.replace(TrainConfig(), optimizer="adamw"), {"optimizer"})
    assert (given.optimizer, given.schedule) == ("adamw", "wsd")
    assert model_defaults_for("clm", ModelConfig(), explicit_flags(["--arch", "llama"])).qk_norm is False
    for other in ("mlm", "prefix_lm", "rtd"):
        assert train_defaults_for(other, TrainConfig(), set()).optimizer == "adamw"
        assert model_defaults_for(other, ModelConfig(), set()).qk_norm is False
    with pytest.raises(UserError, match=r"--fsdp shards them; .* \(clm defaults --optimizer muon; "
                                        r"pass the flag to choose\)$"):
        train_defaults_for("clm", dataclasses.replace(TrainConfig(), fsdp=True), {"fsdp"})


def test_a_clm_run_saves_the_defaults_and_an_init_from_parent_keeps_its_own_model(tmp_path, corpus_dir):
    """What a fresh run resolved is what its checkpoint holds; a parent trained without QK-norm
    (--arch llama) is fine-tuned as it is: its weights fix the model, the default does not."""
    import torch

    from minilm.checkpoint import list_checkpoints
    from tests.conftest import run_in_process
    from tests.test_cli import TINY

    def config_of(out):
        return torch.load(list_checkpoints(str(out))[-1], weights_only=True)["config"]

    fresh = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "fresh", "--max_steps", 2, *TINY)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    saved = config_of(tmp_path / "fresh")
    assert (saved["train"]["optimizer"], saved["train"]["schedule"], saved["model"]["qk_norm"]) == ("muon", "wsd", True)
    parent = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "llama", "--max_steps", 2,
                            "--arch", "llama", *TINY)
    assert parent.returncode == 0, parent.stderr[-2000:]
    assert config_of(tmp_path / "llama")["model"]["qk_norm"] is False
    child = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "child", "--max_steps", 2,
                           "--init_from", list_checkpoints(str(tmp_path / "llama"))[-1], *TINY[8:])
    assert child.returncode == 0, child.stderr[-2000:]
    assert config_of(tmp_path / "child")["model"]["qk_norm"] is False
    assert config_of(tmp_path / "child")["train"]["optimizer"] == "muon"   # a training default still applies
