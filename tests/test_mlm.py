"""The masked-LM objectives (minilm/objectives/mlm.py, wwm.py, span.py): the sparse head gives
exactly the dense loss and gradients, a tiny encoder learns to fill masks, every objective
trains through the Trainer, and train.py / sample.py --fill work from the command line."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minilm.config import ModelConfig
from minilm.data import BlockSource
from minilm.objectives import IGNORE, build_objective
from minilm.tokenizer import NUM_SPECIAL
from minilm.trainer import Trainer
from tests.conftest import load_script
from tests.test_cli import TINY, assert_user_error, run
from tests.test_trainer import make_config as trainer_config


def make_config(out_dir, vocab_size, objective="mlm", **train):
    """test_trainer's tiny run, with 64-token windows (room for several masks per row)."""
    cfg = trainer_config(out_dir, vocab_size, **{"log_every": 10, "warmup_steps": 10, **train})
    cfg.model.seq_len = 64
    cfg.train.objective = objective
    return cfg


def make_trainer(cfg, prepared, tokenizer):
    folder, _ = prepared
    torch.manual_seed(0)
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    train = BlockSource(folder, "train", cfg.model.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    val = BlockSource(folder, "val", cfg.model.seq_len, cfg.train.batch_size, seed=0)
    return Trainer(cfg, objective, train, val, tokenizer, log=lambda *_: None)


# one_thread: tests/conftest.py (models this small gain nothing from a second thread)


# ----------------------------------------------------------------------------- sparse head == dense head
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", ["mlm", "wwm", "span"])
def test_sparse_head_gives_exactly_the_dense_loss_and_gradients(name, padded, tokenizer, prepared, one_thread):
    T = 64
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=T, n_layer=2, n_head=2, n_embd=32,
                      norm="layernorm", bias=True)
    torch.manual_seed(0)
    objective = build_objective(name, cfg, tokenizer)
    with torch.no_grad():
        objective.head.bias.normal_(0, 0.5)            # a non-zero output bias, so the test sees it
        for n, p in objective.backbone.named_parameters():
            if ".attn." in n and p.dim() == 2:         # attention far from uniform (at init it nearly is),
                p.add_(torch.randn_like(p), alpha=0.1)  # so which keys are seen changes the loss
    raw = BlockSource(prepared[0], "train", T, 8, seed=0).batch(0)
    lengths = None
    if padded:  # right-padded rows; past its length a row keeps ordinary tokens, not <pad>, so only
        # `lengths` can keep them from being chosen (the padding id may be a real token elsewhere)
        lengths = torch.tensor([64, 50, 33, 64, 17, 64, 40, 25])
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0), lengths=lengths)
    labels, attn_mask = batch["labels"], batch.get("attn_mask")
    assert (attn_mask is not None) == padded
    assert 0 < batch["counts"]["targets"] < labels.numel() // 4   # only some positions are predicted
    if padded:  # nothing at or beyond a row's length is chosen
        rows, cols = batch["positions"] // T, batch["positions"] % T
        assert (cols < lengths[rows]).all()
        assert (labels[torch.arange(T)[None, :] >= lengths[:, None]] == IGNORE).all()

    def grads_of(loss):
        objective.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in objective.named_parameters()}

    sparse_loss, sums = objective(batch)
    sparse = grads_of(sparse_loss)
    # the dense head: logits at every position, cross-entropy with the unchosen ones ignored
    logits = objective.predict(batch["input_ids"], attn_mask=attn_mask)          # (B, T, V)
    assert logits.shape == (*labels.shape, tokenizer.vocab_size)
    dense_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    dense_loss = dense_loss / (labels != IGNORE).sum()
    dense = grads_of(dense_loss)
    assert sparse_loss.dtype == torch.float32
    # 1e-6 relative: at a loss of ~7 an absolute 1e-6 is two float32 roundings, which a different
    # matmul blocking (the sparse path multiplies other shapes) may legitimately spend
    tolerance = 1e-6 * max(1.0, abs(dense_loss.item()))
    assert abs(sparse_loss.item() - dense_loss.item()) < tolerance
    assert sums["targets"] == (labels != IGNORE).sum()
    assert sparse.keys() == dense.keys()
    for n in dense:
        assert (sparse[n] - dense[n]).abs().max() < 1e-6, n
    assert sparse["head.bias"].abs().sum() > 0 and sparse["backbone.tok_emb.weight"].abs().sum() > 0
    # the comparison can fail: predicting at the wrong positions gives another loss
    shifted = dict(batch, positions=(batch["positions"] + 1) % labels.numel())
    assert abs(objective(shifted)[0].item() - dense_loss.item()) > 1e-3
    if padded:
        with torch.no_grad():
            # the mask matters: a dense pass that attends to the padding gives another loss ...
            unmasked = F.cross_entropy(objective.predict(batch["input_ids"]).flatten(0, 1), labels.flatten(),
                                       ignore_index=IGNORE, reduction="sum") / (labels != IGNORE).sum()
            assert abs(unmasked.item() - dense_loss.item()) > 1e-5                # 10x the tolerance
            # ... and whatever the padding holds, the sparse loss does not see it
            pad = torch.arange(T)[None, :] >= lengths[:, None]
            noise = torch.randint(NUM_SPECIAL, tokenizer.vocab_size, labels.shape,
                                  generator=torch.Generator().manual_seed(1))
            other = dict(batch, input_ids=torch.where(pad, noise, batch["input_ids"]))
            assert abs(objective(other)[0].item() - sparse_loss.item()) < tolerance


def test_bf16_autocast_keeps_the_loss_in_fp32(tokenizer, prepared):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    objective = build_objective("mlm", cfg, tokenizer)
    batch = objective.make_batch(BlockSource(prepared[0], "train", 64, 8, seed=0).batch(0),
                                 torch.Generator().manual_seed(0))
    fp32_loss, _ = objective(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, _ = objective(batch)
    assert bf16_loss.dtype == torch.float32
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.05 * fp32_loss.item()


# ----------------------------------------------------------------------------- it learns
def target_statistics(folder) -> tuple[int, float]:
    """The most frequent non-special token of the train split, and the entropy (nats) of the
    non-special tokens' frequencies: the best loss a model that ignores context can reach."""
    tokens = np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r")
    counts = np.bincount(tokens).astype(np.float64)
    counts[:NUM_SPECIAL] = 0  # special tokens are never targets
    p = counts[counts > 0] / counts.sum()
    return int(counts.argmax()), float(-(p * np.log(p)).sum())


def test_a_tiny_encoder_learns_to_fill_masks(tmp_path, prepared, tokenizer, one_thread):
    """400 steps of 16 x 64 tokens, 2 layers x 64 wide. Measured: validation accuracy on masked
    tokens 0.12 vs 0.066 for always guessing the most frequent token; loss 6.95 -> 5.36 nats,
    below the 5.6 of the best context-free guess."""
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=400, batch_size=16, lr=3e-3, min_lr=3e-4,
                      eval_batches=10)
    trainer = make_trainer(cfg, prepared, tokenizer)
    start = trainer.evaluate()
    trainer.fit()
    end = trainer.last_eval
    # the baseline on the very same validation masks: always answer the most frequent token
    frequent, context_free = target_statistics(prepared[0])
    hits = n = 0
    for i in range(cfg.train.eval_batches):
        batch = trainer.objective.make_batch(trainer.val_source.batch(i, 0), torch.Generator().manual_seed(i))
        hits += (batch["targets"] == frequent).sum().item()
        n += len(batch["targets"])
    baseline = hits / n
    print(f"\nmasked-token accuracy {end['acc']:.4f} vs most-frequent-token baseline {baseline:.4f} "
          f"(token {frequent}); loss {start['loss']:.3f} -> {end['loss']:.3f}, context-free {context_free:.3f}")
    assert n > 500
    assert start["loss"] > 6.0                                   # about ln(1024) = 6.93 at the start
    assert end["loss"] < start["loss"] - 1.2, (start, end)
    assert end["loss"] < context_free - 0.1, (end, context_free)   # it uses the context
    assert end["acc"] > baseline + 0.03 and end["acc"] > 1.4 * baseline, (end["acc"], baseline)
    assert 0 < end["bpb"] < start["bpb"]


@pytest.mark.parametrize("name", ["wwm", "span"])
def test_whole_word_and_span_objectives_train(name, tmp_path, prepared, tokenizer, one_thread):
    """They train through the Trainer; and exactly: the first step's loss is the masked tokens'
    mean cross-entropy (dense head, F.cross_entropy) of the initial model on the batch the
    trainer made, and the final evaluation is that of the trained model on its fixed masks."""
    import copy
    from tests.test_trainer import recorded, summed_loss_and_count
    cfg = make_config(tmp_path, tokenizer.vocab_size, objective=name, max_steps=40, lr=3e-3, eval_batches=2)
    trainer = make_trainer(cfg, prepared, tokenizer)
    initial = copy.deepcopy(trainer.objective)
    made = recorded(trainer.objective)
    losses = trainer.fit()
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    objective = trainer.objective.eval()
    del objective.make_batch                          # stop recording
    nll = targets = correct = 0
    with torch.no_grad():
        loss, count = summed_loss_and_count(initial, made[0])
        assert losses[0] == pytest.approx((loss / count).item(), rel=1e-5)
        for i in range(cfg.train.eval_batches):     # evaluation's masks: a generator seeded by the batch index
            batch = objective.make_batch(trainer.val_source.batch(i, 0), torch.Generator().manual_seed(i))
            loss, count = summed_loss_and_count(objective, batch)
            chosen = batch["labels"] != IGNORE
            nll, targets = nll + loss.item(), targets + int(count)
            correct += int((objective.predict(batch["input_ids"])[chosen].argmax(-1) == batch["labels"][chosen]).sum())
    assert trainer.last_eval["loss"] == pytest.approx(nll / targets, rel=1e-5)
    assert trainer.last_eval["acc"] == correct / targets
    assert trainer.last_eval["bpb"] > 0


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, corpus_dir):
    """A tiny masked-LM encoder trained through train.py."""
    out = tmp_path_factory.mktemp("mlm")
    result = run("train.py", "--objective", "mlm", "--data", corpus_dir, "--out_dir", out, "--max_steps", 6,
                 "--eval_every", 6, "--mask_prob", 0.2, *TINY)
    return out, result


def test_train_py_pretrains_an_encoder(encoder_run):
    out, result = encoder_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "objective=mlm" in result.stdout and "mask_prob=0.2" in result.stdout
    steps = [ln for ln in result.stdout.splitlines() if ln.startswith("step") and "tok/s" in ln]
    assert len(steps) == 6
    val = [ln for ln in result.stdout.splitlines() if "val" in ln and "acc" in ln]
    assert val, result.stdout
    assert any(name.endswith(".pt") for name in os.listdir(out))


def test_fill_mask_prints_top_k_candidates_for_every_mask(encoder_run):
    out, _ = encoder_run
    result = run("sample.py", "--ckpt", out, "--fill", "The value of <mask> is a <mask>.", "--top_k", 3,
                 "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "<mask> 1 of 2:" and lines[4] == "<mask> 2 of 2:"
    for block in (lines[1:4], lines[5:8]):
        probs = [float(ln.split()[0]) for ln in block]
        assert all(ln.startswith("  ") and '"' in ln for ln in block)
        assert all(0 < p <= 1 for p in probs) and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-4
    assert lines[8].startswith('filled: "The value of') and "<mask>" not in lines[8]
    assert len(lines) == 9
    # the default top-k when filling is 5
    default = run("sample.py", "--ckpt", out, "--fill", "a <mask> b", "--device", "cpu")
    assert default.returncode == 0 and len(default.stdout.splitlines()) == 1 + 5 + 1


def test_fill_mask_refuses_what_it_cannot_do(encoder_run, tmp_path, prepared, tokenizer):
    out, _ = encoder_run
    # an encoder cannot generate; a text without <mask> has nothing to fill
    assert_user_error(run("sample.py", "--ckpt", out, "--device", "cpu"), "encoder", "--fill")
    assert_user_error(run("sample.py", "--ckpt", out, "--fill", "no mask here", "--device", "cpu"), "<mask>")
    # a decoder cannot fill masks
    cfg = make_config(tmp_path, tokenizer.vocab_size, objective="clm", max_steps=1)
    make_trainer(cfg, prepared, tokenizer).save()                       # an untrained decoder
    assert_user_error(run("sample.py", "--ckpt", tmp_path, "--fill", "a <mask> b", "--device", "cpu"),
                      "--fill needs a masked-LM checkpoint", "clm")
    # nor can an encoder without a masked-LM head (sentence order alone)
    sop = tmp_path / "sop"
    sop.mkdir()
    cfg = make_config(sop, tokenizer.vocab_size, objective="sop", max_steps=1)
    torch.manual_seed(0)
    Trainer(cfg, build_objective("sop", cfg.model, tokenizer, cfg.obj), None, None, tokenizer,
            log=lambda *_: None).save()
    assert_user_error(run("sample.py", "--ckpt", sop, "--fill", "a <mask> b", "--device", "cpu"),
                      "no masked-LM head")
    assert_user_error(run("sample.py", "--ckpt", sop, "--device", "cpu"), "cannot generate", "no masked-LM head")


@pytest.mark.parametrize("name", ["mlm", "mlm+sop"])
def test_fill_mask_candidates_are_the_softmax_at_each_mask(name, tokenizer):
    """fill_mask's candidates are, mask by mask and in text order, the top-k of the softmax of the
    dense logits at that mask's position, with the framing the objective was trained on."""
    sample = load_script("sample.py")
    from minilm.tokenizer import CLS_ID, EOS_ID, MASK_ID, SEP_ID
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=32)
    objective = build_objective(name, cfg, tokenizer).eval()
    candidates, ids = sample.fill_mask(objective, tokenizer, "The value <mask> of a <mask>.", 4, "cpu")
    framing = (CLS_ID, SEP_ID) if name == "mlm+sop" else (EOS_ID, None)
    assert ids[0] == framing[0] and (framing[1] is None or ids[-1] == framing[1])
    where = [i for i, t in enumerate(ids) if t == MASK_ID]
    assert len(where) == 2 == len(candidates)
    with torch.no_grad():
        probs = objective.predict(torch.tensor([ids]))[0].softmax(-1)       # (T, V)
    for position, cands in zip(where, candidates):
        top = probs[position].topk(4)
        assert [t for t, _ in cands] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([p for _, p in cands]), top.values, rtol=1e-5, atol=1e-6)
    # the space before a mask goes into the mask: "value" + <mask>, not "value" + "▁" + <mask>
    assert tokenizer.decode(ids[1:where[0]]) == "The value"


def test_bad_masking_flag_is_one_line(encoder_run, corpus_dir):
    out, _ = encoder_run
    # same data and vocabulary: reuses the tokenizer and token files already in out
    result = run("train.py", "--objective", "span", "--data", corpus_dir, "--out_dir", out, "--max_steps", 1,
                 "--mask_replace_prob", 0.9, "--random_replace_prob", 0.2, *TINY)
    assert_user_error(result, "--mask_replace_prob", "--random_replace_prob")


def test_flops_per_token_counts_what_the_sparse_step_computes():
    """The trainer's MFU divides by objective.flops_per_token(). For MLM it must count the sparse
    head and last layer, not a dense model's 6N (which showed "MFU 99%" for a ~60% run). Checked
    against torch's FlopCounterMode on a real forward + backward: the formula's attention term
    (12 L H D T) is a little above what the counter attributes to SDPA, so both objectives sit a
    few percent above the count, by the same margin."""
    from torch.utils.flop_counter import FlopCounterMode
    from minilm.config import ObjectiveConfig
    cfg = ModelConfig(vocab_size=2048, seq_len=64, n_layer=3, n_head=4, n_embd=128, position="learned",
                      norm="layernorm", bias=True)
    ratio = {}
    for name in ("clm", "mlm"):
        torch.manual_seed(0)
        objective = build_objective(name, cfg, None, ObjectiveConfig(mask_prob=0.15))
        batch = objective.make_batch(torch.randint(NUM_SPECIAL, 2048, (16, 65)), torch.Generator().manual_seed(0))
        if name == "mlm":
            assert abs(int(batch["counts"]["targets"]) / (16 * 64) - 0.15) < 0.02
        with FlopCounterMode(display=False) as counter:
            loss, _ = objective(batch)
            loss.backward()
        ratio[name] = objective.flops_per_token() / (counter.get_total_flops() / (16 * 64))
        assert 1.0 <= ratio[name] < 1.1, (name, ratio[name])
    assert abs(ratio["mlm"] - ratio["clm"]) < 0.03, ratio
