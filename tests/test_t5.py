"""`--objective t5` (minilm/objectives/t5.py) end to end: the batch (lossless, exact lengths,
decoder input = labels shifted right), the encoder-decoder's dependencies (cross-attention,
causal decoder, an encoder blind to the decoder), one shared embedding, exact accumulation,
FLOPs, the model settings it declares and the combinations it refuses, learning, and a real
train.py run that resumes. The corruption primitive itself is tests/test_t5_noise.py's."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minilm import model
from minilm.checkpoint import load_checkpoint
from minilm.config import Config, ModelConfig, ObjectiveConfig
from minilm.data import BlockSource
from minilm.errors import UserError
from minilm.objectives import build_objective, model_config_for, window_length_for
from minilm.objectives.t5 import DECODER_START_ID, SpanCorruption
from minilm.tokenizer import EOS_ID, NUM_SPECIAL, PAD_ID, SENTINEL_IDS
from minilm.trainer import Trainer, build_optimizer
from tests.conftest import load_script
from tests.test_cli import TINY, run
from tests.test_t5_noise import reconstruct
from tests.test_trainer import accumulated_gradients, make_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

V = 512


def tiny(seq_len=64, **changes) -> ModelConfig:
    return ModelConfig(vocab_size=V, seq_len=seq_len, n_layer=2, n_head=2, n_embd=32, **changes)


def t5(seq_len=64, tokenizer=None, **changes) -> SpanCorruption:
    torch.manual_seed(0)
    return build_objective("t5", tiny(seq_len, **changes), tokenizer)


# ----------------------------------------------------------------------------- the batch
@pytest.mark.parametrize("seq_len, raw_length, target_length", [(64, 70, 14), (512, 568, 114)])
def test_batch_is_lossless_with_exact_lengths(seq_len, raw_length, target_length):
    """seq_len 64: 70 raw tokens hold round(10.5) = 10 noise tokens (half to even) in round(10/3)
    = 3 spans: input 70 - 10 + 3 + 1 = 64, target 10 + 3 + 1 = 14; 71 would give 11 noise
    tokens in 4 spans, an input of 65. seq_len 512: T5's 568 -> 512 / 114."""
    objective = t5(seq_len)
    assert window_length_for("t5", objective.backbone.cfg, ObjectiveConfig()) == raw_length
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(NUM_SPECIAL, V, (16, raw_length), generator=g)
    batch = objective.make_batch(raw, g)
    assert batch["input_ids"].shape == (16, seq_len)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (16, target_length)
    assert int(batch["counts"]["targets"]) == 16 * target_length
    for row in range(16):
        assert reconstruct(batch["input_ids"][row].tolist(), batch["labels"][row].tolist()) == raw[row].tolist()
    assert (batch["labels"][:, 0] == SENTINEL_IDS[0]).all() and (batch["labels"][:, -1] == EOS_ID).all()
    # the decoder reads the labels shifted right, starting from <pad>
    assert DECODER_START_ID == PAD_ID
    assert (batch["decoder_input_ids"][:, 0] == PAD_ID).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])


def test_block_source_reads_the_objectives_window(prepared):
    """train.py hands make_source the objective's window_length: 70 raw tokens for seq_len 64,
    contiguous slices of the token file, instead of seq_len + 1."""
    import numpy as np
    folder, _ = prepared
    source = BlockSource(folder, "train", 64, 4, seed=2, window_length=window_length_for("t5", tiny(64)))
    rows = source.batch(0)
    assert rows.shape == (4, 70)
    tokens = torch.from_numpy(np.memmap(f"{folder}/train.bin", dtype=np.uint16, mode="r").astype(np.int64))
    every_window = tokens.unfold(0, 70, 1)                                  # (N - 69, 70), a view
    for row in rows:
        assert (every_window == row).all(dim=1).any(), "a window that is not a slice of the token stream"


# ----------------------------------------------------------------------------- the encoder-decoder
def test_cross_attention_and_causality():
    objective = t5(64).eval()
    backbone = objective.backbone
    g = torch.Generator().manual_seed(3)
    batch = objective.make_batch(torch.randint(NUM_SPECIAL, V, (2, 70), generator=g), g)
    inputs, decoder_ids = batch["input_ids"], batch["decoder_input_ids"]
    with torch.no_grad():
        hidden = backbone.decode(decoder_ids, backbone.encode(inputs))
        # the decoder's output changes when one encoder input token changes, at every position
        other_inputs = inputs.clone()
        other_inputs[:, 5] = (other_inputs[:, 5] + 1 - NUM_SPECIAL) % (V - NUM_SPECIAL) + NUM_SPECIAL
        changed = backbone.decode(decoder_ids, backbone.encode(other_inputs))
        assert ((changed - hidden).abs().amax(dim=-1) > 1e-4).all()
        # the decoder at t ignores decoder tokens after t
        k = 6
        later = decoder_ids.clone()
        later[:, k:] = torch.randint(NUM_SPECIAL, V, later[:, k:].shape, generator=g)
        after = backbone.decode(later, backbone.encode(inputs))
        assert torch.allclose(after[:, :k], hidden[:, :k], atol=1e-6, rtol=0)
        assert ((after[:, k:] - hidden[:, k:]).abs().amax(dim=-1) > 1e-4).all()

    # the encoder's output, inside the objective's forward, does not depend on the decoder input
    seen = []
    handle = backbone.encoder.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        objective(batch)
        objective({**batch, "decoder_input_ids": torch.randint(NUM_SPECIAL, V, decoder_ids.shape, generator=g)})
    handle.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_one_shared_embedding_appears_once_in_the_optimizer():
    objective = t5(32)
    backbone = objective.backbone
    table = backbone.encoder.tok_emb.weight
    assert backbone.decoder.tok_emb.weight is table and backbone.output_weight is table
    optimizer = build_optimizer(objective, Config().train, torch.device("cpu"))
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p is table for p in in_optimizer) == 1
    assert len(in_optimizer) == len({id(p) for p in objective.parameters()})
    # and a step through the decoder alone moves the one table
    g = torch.Generator().manual_seed(0)
    batch = objective.make_batch(torch.randint(NUM_SPECIAL, V, (2, 34), generator=g), g)
    objective(batch)[0].backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


class RowSeeded(SpanCorruption):
    """Corrupts each row with its own generator, seeded by the row's number (the raw row's first
    column), so a row is corrupted the same whichever micro-batch it lands in."""

    def make_batch(self, raw, generator=None):
        rows = [super(RowSeeded, self).make_batch(r[None, 1:], torch.Generator().manual_seed(int(r[0]))) for r in raw]
        batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "decoder_input_ids", "labels")}
        return {**batch, "counts": {"targets": sum(r["counts"]["targets"] for r in rows)}}


def test_accumulation_equals_one_big_batch(tmp_path):
    g = torch.Generator().manual_seed(4)
    big = torch.cat([torch.arange(8)[:, None], torch.randint(NUM_SPECIAL, V, (8, 34), generator=g)], dim=1)

    def gradients(accum):
        cfg = make_config(tmp_path, V, objective="t5", grad_accum=accum, batch_size=8 // accum)
        cfg.model = model_config_for("t5", cfg.model)
        return accumulated_gradients(cfg, lambda c: RowSeeded(c.model, None, c.obj), big, accum)

    loss1, g1 = gradients(1)
    loss2, g2 = gradients(2)
    assert torch.allclose(loss1, loss2, atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-7, rtol=1e-4), name


def test_flops_per_token_counts_what_a_step_computes(monkeypatch):
    """Against FlopCounterMode on one forward + backward (attention as plain matmuls, which the
    counter sees); the formula adds only the norms' 6N, which the counter ignores: under 2%.
    A count of the decoder's tokens at the encoder's length, or of the cross-attention keys and
    values per decoder token, is off by far more."""
    monkeypatch.setattr(model, "attention", model.attention_math)
    for changes in ({}, {"n_decoder_layer": 3, "tie_embeddings": False}):
        torch.manual_seed(0)
        objective = build_objective("t5", ModelConfig(vocab_size=2048, seq_len=128, n_layer=2, n_head=4, n_embd=64,
                                                      **changes))
        g = torch.Generator().manual_seed(0)
        batch = objective.make_batch(torch.randint(NUM_SPECIAL, 2048, (4, objective.raw_length), generator=g), g)
        with FlopCounterMode(display=False) as counter:
            objective(batch)[0].backward()
        ratio = objective.flops_per_token() / (counter.get_total_flops() / (4 * 128))
        assert 1.0 <= ratio < 1.02, (changes, ratio)


# ----------------------------------------------------------------------------- settings and refusals
def test_decoder_depth_defaults_to_the_encoders_and_is_kept_when_given():
    resolved = model_config_for("t5", tiny())
    assert resolved.n_decoder_layer == 2 and model_config_for("t5", resolved) == resolved
    assert model_config_for("t5", tiny(n_decoder_layer=1)).n_decoder_layer == 1
    assert len(t5().backbone.decoder.blocks) == 2
    with pytest.raises(ValueError, match="n_decoder_layer=2"):   # a config that skipped model_config_for
        SpanCorruption(tiny())


@pytest.mark.parametrize("name, changes, options, message", [
    ("t5+mlm", {}, {}, "t5 trains an encoder-decoder and mlm another backbone"),
    ("sop+t5", {}, {}, "t5 trains an encoder-decoder and sop another backbone"),
    ("clm", {"n_decoder_layer": 2}, {}, "--n_decoder_layer is for encoder-decoder objectives"),
    ("t5", {}, {"noise_density": 0.6}, "makes targets of 86 tokens, more than the decoder's 64 positions"),
    ("t5", {"seq_len": 4096}, {}, "--seq_len 4096: T5 span corruption of 4550 tokens needs 227 noise spans"),
    ("t5", {"seq_len": 2}, {}, "--seq_len 2: T5 inputs hold at least 3 tokens"),
    ("t5", {}, {"noise_density": 1.0}, r"--noise_density must be in \(0, 1\)"),
    ("t5", {}, {"mean_noise_span_length": 0.5}, "--mean_noise_span_length must be >= 1"),
])
def test_impossible_settings_are_one_line_user_errors(name, changes, options, message):
    with pytest.raises(UserError, match=message) as err:
        model_cfg = model_config_for(name, tiny(**changes))
        window_length_for(name, model_cfg, ObjectiveConfig(**options))
    assert "\n" not in str(err.value)


def test_init_from_refuses_to_cross_between_encoder_decoder_and_single_stack():
    train_script = load_script("train.py")
    for parent_objective, objective in (("t5", "clm"), ("t5", "mlm"), ("clm", "t5")):
        model_cfg = model_config_for(parent_objective, tiny())
        parent = {"config": Config(model=model_cfg).to_dict(), "objective": parent_objective}
        with pytest.raises(UserError, match=f"its {parent_objective} model is an? .* but {objective} trains"):
            train_script.config_for_init(["--objective", objective], parent, "parent.pt")
    parent = {"config": Config(model=model_config_for("t5", tiny())).to_dict(), "objective": "t5"}
    assert train_script.config_for_init(["--objective", "t5"], parent, "parent.pt").model.n_decoder_layer == 2


# ----------------------------------------------------------------------------- training
def tiny_run(name, tmp_path, prepared, tokenizer, options=None) -> tuple[dict, dict]:
    """(held-out metrics before, after) 60 steps of objective `name` (t5, or ul2 on t5's model) on
    the built-in corpus: 2 x 128 blocks, batch 16, lr 3e-3."""
    cfg = make_config(tmp_path, tokenizer.vocab_size, objective=name, max_steps=60, lr=3e-3, min_lr=3e-4,
                      eval_batches=4, batch_size=16)
    options = cfg.obj if options is None else options
    cfg.model = model_config_for(name, cfg.model)
    torch.manual_seed(0)
    objective = build_objective(name, cfg.model, tokenizer, options)
    folder, _ = prepared
    window = window_length_for(name, cfg.model, options)
    train = BlockSource(folder, "train", cfg.model.seq_len, cfg.train.batch_size, seed=1, window_length=window)
    val = BlockSource(folder, "val", cfg.model.seq_len, cfg.train.batch_size, window_length=window)
    trainer = Trainer(cfg, objective, train, val, tokenizer, log=lambda *_: None)
    start = trainer.evaluate()
    trainer.fit()
    return start, trainer.last_eval


def test_a_tiny_model_learns_span_corruption(tmp_path, prepared, tokenizer):
    """Start: about ln(V) = 6.9 nats. A few seconds later the loss over the target tokens
    (sentinels, hidden tokens, <eos>) on held-out windows is far lower."""
    start, end = tiny_run("t5", tmp_path, prepared, tokenizer)
    assert start["loss"] > math.log(tokenizer.vocab_size) - 0.3, start
    assert end["loss"] < start["loss"] - 2.0, (start, end)
    assert end["acc"] > 0.3 and 0 < end["bpb"] < start["bpb"], end


def test_train_py_t5_trains_resumes_and_saves_the_decoder_depth(tmp_path, corpus_dir):
    out = tmp_path / "run"
    first = run("train.py", "--objective", "t5", "--data", corpus_dir, "--out_dir", out, "--max_steps", 3,
                "--eval_every", 3, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "n_decoder_layer=1" in first.stdout and "val loss" in first.stdout
    resumed = run("train.py", "--resume", "--out_dir", out, "--max_steps", 5, "--device", "cpu", "--threads", 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step      5/5" in resumed.stdout
    state = load_checkpoint(str(out / "ckpt-00000005.pt"))
    assert state["objective"] == "t5" and state["config"]["model"]["n_decoder_layer"] == 1
    assert any(key.startswith("backbone.decoder.blocks.0.cross.") for key in state["model"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
