"""The training loop: it learns, it resumes exactly, accumulation is exact, the optimizer and the
schedule do what the docs say."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minilm.checkpoint import load_checkpoint, tensor_to_bytes
from minilm.config import Config, ModelConfig
from minilm.data import BlockSource, SegmentPairSource
from minilm.model import padding_mask
from minilm.objectives import IGNORE, build_objective
from minilm.objectives.clm import CausalLM
from minilm.tokenizer import Tokenizer
from minilm.trainer import Trainer, build_optimizer, lr_at
from tests.test_sop import numbered  # noqa: F401  (the module-scoped corpus of numbered sentences)


def make_config(out_dir, vocab_size, **train):
    """The tiny test run: clm unless train holds another `objective`."""
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=vocab_size, seq_len=32, n_layer=2, n_head=2, n_embd=64)
    cfg.train.out_dir = str(out_dir)
    cfg.train.batch_size = 8
    cfg.train.device = "cpu"
    cfg.train.log_every = 5
    cfg.train.eval_every = 10_000
    cfg.train.ckpt_every = 10_000
    cfg.train.warmup_steps = 5
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


class Slices:
    """A data source over fixed rows: micro-batch m of every step is rows m*size .. (m+1)*size-1."""

    def __init__(self, big, size):
        self.big, self.size = big, size

    def batch(self, step, micro=0):
        return self.big[micro * self.size:(micro + 1) * self.size]


def accumulated_gradients(cfg, make_objective, rows, accum: int):
    """(loss, {parameter name: gradient}) of one step's accumulation over `rows`, split into
    `accum` micro-batches; the objective from make_objective(cfg) after torch.manual_seed(0)."""
    torch.manual_seed(0)
    objective = make_objective(cfg)
    trainer = Trainer(cfg, objective, Slices(rows, len(rows) // accum), None, None, log=lambda *_: None)
    loss = trainer.accumulate_gradients(0)
    return loss, {n: p.grad.clone() for n, p in objective.named_parameters()}


def make_trainer(cfg, prepared, tokenizer, val=False):
    folder, _ = prepared
    torch.manual_seed(0)
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    train = BlockSource(folder, "train", cfg.model.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    val_source = BlockSource(folder, "val", cfg.model.seq_len, cfg.train.batch_size) if val else None
    return Trainer(cfg, objective, train, val_source, tokenizer, log=lambda *_: None)


def unigram_entropy(folder) -> float:
    """Entropy (nats) of the train split's token frequencies: the best loss a model that ignores
    context can reach."""
    tokens = np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r")
    p = np.bincount(tokens) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_loss_falls_well_below_its_start(tmp_path, prepared, tokenizer, one_thread):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=200, lr=3e-3, min_lr=3e-4, eval_batches=4)
    cfg.model.seq_len, cfg.model.n_embd = 64, 128
    trainer = make_trainer(cfg, prepared, tokenizer, val=True)
    start = trainer.evaluate()
    losses = trainer.fit()
    end = trainer.last_eval
    context_free = unigram_entropy(prepared[0])   # about 5.7 nats for this corpus and vocab
    # at the start: about uniform guessing, ln(V) = 6.93 nats
    assert start["loss"] > math.log(tokenizer.vocab_size) - 0.3
    # at the end: well below the start, and below what any context-free model could do, on
    # held-out documents, so the model learned to use context
    assert end["loss"] < start["loss"] - 1.5, (start, end)
    assert end["loss"] < context_free - 0.3, (end, context_free)
    assert sum(losses[-10:]) / 10 < context_free - 0.3
    assert 0 < end["bpb"] < start["bpb"]
    assert end["acc"] > 0.08


def test_resume_continues_exactly(tmp_path, prepared, tokenizer):
    """Stop at step 8, resume in a fresh Trainer: the losses of steps 9..16 are identical to a run
    that never stopped. Dropout is on, so the RNG state must be restored too."""
    def config(out):
        cfg = make_config(out, tokenizer.vocab_size, max_steps=16)
        cfg.model.dropout = 0.1
        return cfg

    straight = make_trainer(config(tmp_path / "a"), prepared, tokenizer).fit()

    first = make_trainer(config(tmp_path / "b"), prepared, tokenizer)
    first.fit(until=8)
    assert first.step == 8
    torch.manual_seed(12345)  # scramble the global RNG: resume must restore it
    second = make_trainer(config(tmp_path / "b"), prepared, tokenizer)
    second.load(os.path.join(tmp_path / "b", "ckpt-00000008.pt"))
    assert second.step == 8
    resumed = second.fit()
    assert first.history == straight[:8]
    assert resumed == straight[8:], (resumed, straight[8:])


class RaggedCLM(CausalLM):
    """CLM whose rows predict different numbers of tokens (as MLM batches do): a row ignores its
    first 4*(first token % 7) targets, a rule that depends on the row alone, not on which
    micro-batch it lands in. A per-micro-batch mean would weight tokens unequally."""

    def make_batch(self, raw, generator=None, lengths=None):
        batch = super().make_batch(raw, generator)
        skip = 4 * (raw[:, :1] % 7)
        cols = torch.arange(batch["labels"].shape[1])[None, :]
        batch["labels"][cols < skip] = IGNORE
        batch["counts"] = {"targets": (batch["labels"] != IGNORE).sum()}
        return batch


class SlicedSource:
    """Micro-batch m of a step is rows [m*b, (m+1)*b) of one fixed big batch."""

    def __init__(self, big, micro_size):
        self.big, self.micro_size = big, micro_size

    def batch(self, step, micro=0):
        return self.big[micro * self.micro_size:(micro + 1) * self.micro_size]


def test_accumulation_equals_one_big_batch(tmp_path, prepared, tokenizer):
    folder, _ = prepared
    big = BlockSource(folder, "train", 32, 12, seed=3).batch(0)

    def gradients(accum):
        cfg = make_config(tmp_path, tokenizer.vocab_size, grad_accum=accum, batch_size=12 // accum)
        torch.manual_seed(0)
        objective = RaggedCLM(cfg.model, tokenizer)
        trainer = Trainer(cfg, objective, SlicedSource(big, 12 // accum), None, tokenizer, log=lambda *_: None)
        loss = trainer.accumulate_gradients(0)
        return loss, {n: p.grad.clone() for n, p in objective.named_parameters()}

    loss1, g1 = gradients(1)
    loss3, g3 = gradients(3)
    assert torch.allclose(loss1, loss3, atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g3[name], atol=1e-6, rtol=1e-4), name
    # and the naive average of per-micro-batch means really gives another gradient here (so this
    # test can fail): micro-batches with few targets would weigh more per token
    cfg = make_config(tmp_path, tokenizer.vocab_size)
    torch.manual_seed(0)
    objective = RaggedCLM(cfg.model, tokenizer)
    for i in range(3):
        (objective(objective.make_batch(big[i * 4:(i + 1) * 4]))[0] / 3).backward()
    naive = objective.backbone.tok_emb.weight.grad
    exact = g1["backbone.tok_emb.weight"]
    assert (naive - exact).norm() > 0.02 * exact.norm()


def recorded(objective) -> list[dict]:
    """Keep every batch the objective's make_batch returns (the trainer's calls), in order."""
    made, make_batch = [], objective.make_batch

    def recording(*args, **kwargs):
        made.append(make_batch(*args, **kwargs))
        return made[-1]
    objective.make_batch = recording
    return made


def summed_loss_and_count(objective, batch):
    """(summed loss, number of targets) of one batch, computed without the objective's forward:
    the LM head at every position (causal LM), the dense masked-LM head, or the sentence-order
    head, and F.cross_entropy with reduction sum."""
    if batch["labels"].dim() == 2:                                # a token per position: every position's logits
        if hasattr(objective, "predict"):                         # masked LM
            logits = objective.predict(batch["input_ids"], attn_mask=batch.get("attn_mask"),
                                       segment_ids=batch.get("segment_ids"))
        else:                                                     # causal LM
            logits = objective.backbone.logits(objective.backbone(batch["input_ids"]))
        labels = batch["labels"].flatten()
        return F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE, reduction="sum"), (labels != IGNORE).sum()
    ids = batch["input_ids"]                                      # sentence order: one label per row
    hidden = objective.backbone(ids, mask=padding_mask(batch["lengths"], ids.shape[1]),
                                segment_ids=batch["segment_ids"])
    logits = objective.head(objective.pooler(hidden))
    return F.cross_entropy(logits, batch["labels"], reduction="sum"), torch.tensor(len(ids))


@pytest.mark.parametrize("name", ["mlm", "mlm+sop"])
def test_accumulated_gradient_is_the_global_mean_over_the_step(name, tmp_path, prepared, tokenizer, numbered,
                                                              one_thread):
    """The gradient of one step of 3 micro-batches equals that of sum(token losses of all
    micro-batches) / (their total count), each part of a combined objective on its own, computed
    here from the batches the trainer made, with the dense heads and F.cross_entropy: a
    reference that cannot share a normalization bug with the objective's forward or the trainer."""
    cfg = make_config(tmp_path, tokenizer.vocab_size, grad_accum=3, batch_size=4, objective=name)
    if name == "mlm+sop":
        _, tokenizer, folder = numbered
        cfg.model.vocab_size, cfg.obj.objective_weights = tokenizer.vocab_size, "1,0.5"
        source = SegmentPairSource(folder, "train", cfg.model.seq_len, 4, seed=1, log=None)
    else:
        source = BlockSource(prepared[0], "train", cfg.model.seq_len, 4, seed=1)
    torch.manual_seed(0)
    objective = build_objective(name, cfg.model, tokenizer, cfg.obj)
    trainer = Trainer(cfg, objective, source, None, tokenizer, log=lambda *_: None)
    made = recorded(objective)
    step_loss = trainer.accumulate_gradients(0)
    got = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    assert len(made) == 3
    objective.zero_grad(set_to_none=True)
    parts = objective.parts if name == "mlm+sop" else {name: objective}
    weights = objective.weights if name == "mlm+sop" else [1.0]
    reference = 0.0
    for (part_name, part), weight in zip(parts.items(), weights):
        per_batch = [summed_loss_and_count(part, batch[part_name] if name == "mlm+sop" else batch) for batch in made]
        counts = [int(count) for _, count in per_batch]
        assert len(set(counts)) > 1 or part_name == "sop", counts   # masked tokens: unequal counts
        reference = reference + weight * sum(loss for loss, _ in per_batch) / sum(counts)
    reference.backward()
    assert step_loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for n, p in objective.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert got.keys() == {n for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mlm", "span"])
def test_masked_lm_resumes_exactly_and_masks_depend_on_the_step_alone(name, tmp_path, prepared, tokenizer,
                                                                     one_thread):
    """Stop a masked LM with dropout at step 3 and resume it in a fresh Trainer: the same inputs and
    masks at every step, the same losses. And a trainer that starts at step 4 without running the
    steps before builds exactly step 4's batch: masks come from the step, not from a run-long
    stream of random numbers."""
    def trainer_for(out):
        cfg = make_config(out, tokenizer.vocab_size, max_steps=6, objective=name)
        cfg.model.dropout = 0.1
        trainer = make_trainer(cfg, prepared, tokenizer)
        trainer.peak_flops = 1e9  # skip measuring the matmul peak (only the MFU column uses it)
        torch.manual_seed(99)     # what train.py does per rank after building the model
        return trainer, recorded(trainer.objective)

    straight, straight_batches = trainer_for(tmp_path / "a")
    losses = straight.fit()
    first, _ = trainer_for(tmp_path / "b")
    first.fit(until=3)
    second, resumed_batches = trainer_for(tmp_path / "b")
    torch.manual_seed(12345)                              # scramble the global RNG: resume restores it
    second.load(os.path.join(tmp_path / "b", "ckpt-00000003.pt"))
    assert second.fit() == losses[3:]
    for want, got in zip(straight_batches[3:], resumed_batches, strict=True):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
    jumped, jumped_batches = trainer_for(tmp_path / "c")
    jumped.step = 4                                       # no checkpoint, no steps run before
    jumped.fit(until=5)
    assert torch.equal(jumped_batches[0]["input_ids"], straight_batches[4]["input_ids"])
    assert torch.equal(jumped_batches[0]["labels"], straight_batches[4]["labels"])
    assert not torch.equal(straight_batches[4]["labels"] != IGNORE, straight_batches[5]["labels"] != IGNORE)


def test_checkpoint_is_self_contained(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=3)
    trainer = make_trainer(cfg, prepared, tokenizer)
    trainer.fit()
    state = load_checkpoint(os.path.join(tmp_path, "ckpt-00000003.pt"))  # weights_only=True inside
    assert state["step"] == 3
    assert Config.from_dict(state["config"]) == cfg
    assert Tokenizer(tensor_to_bytes(state["tokenizer"])).encode("hello world") == tokenizer.encode("hello world")
    fresh = build_objective(state["objective"], Config.from_dict(state["config"]).model, tokenizer)
    fresh.load_state_dict(state["model"])
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16))
    trainer.objective.eval()
    fresh.eval()
    assert torch.equal(fresh.backbone(ids), trainer.objective.backbone(ids))


def test_optimizer_groups_cover_each_parameter_once(tokenizer):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=16, n_layer=2, n_head=2, n_embd=32,
                            norm="layernorm", bias=True)
    objective = build_objective("clm", cfg.model, tokenizer)
    opt = build_optimizer(objective, cfg.train, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])      # norm gains and biases
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted({id(p) for p in objective.parameters()})
    # the tied embedding/LM-head matrix is one parameter, listed once
    assert objective.backbone.output_weight is objective.backbone.tok_emb.weight
    assert grouped.count(id(objective.backbone.tok_emb.weight)) == 1


def test_two_steps_are_hand_computed_clipped_adamw_updates(tmp_path, prepared, tokenizer, one_thread):
    """The parameters and Adam moments after each Trainer step equal AdamW written out by hand:
    the gradient (from a separate copy of the model) clipped to a global norm, exp_avg and
    exp_avg_sq with beta1 and beta2, bias correction, weight decay decoupled and only on
    matrices, the learning rate of the warmup. Distinctive settings, so that swapped betas, a
    missing clip or decay on the norms each change the numbers."""
    import copy
    beta1, beta2, eps, decay, clip, peak, warmup = 0.8, 0.9, 1e-8, 0.1, 0.05, 1e-2, 4
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=10, lr=peak, beta1=beta1, beta2=beta2,
                      weight_decay=decay, grad_clip=clip, warmup_steps=warmup)
    trainer = make_trainer(cfg, prepared, tokenizer)
    twin = copy.deepcopy(trainer.objective)            # computes the reference gradients
    names = [n for n, _ in twin.named_parameters()]
    params = {n: p.detach().double().clone() for n, p in twin.named_parameters()}
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in params.items()}
    clipped = []
    for step in range(2):
        with torch.no_grad():
            for n, p in twin.named_parameters():
                p.copy_(params[n])
        twin.zero_grad(set_to_none=True)
        twin(twin.make_batch(trainer.train_source.batch(step, 0)))[0].backward()
        grads = {n: p.grad.double() for n, p in twin.named_parameters()}
        norm = math.sqrt(sum((g ** 2).sum().item() for g in grads.values()))
        clipped.append(norm > clip)
        grads = {n: g * min(1.0, clip / (norm + 1e-6)) for n, g in grads.items()}
        lr = peak * (step + 1) / warmup
        t = step + 1
        for n in names:
            m, v = moments[n]
            m = beta1 * m + (1 - beta1) * grads[n]
            v = beta2 * v + (1 - beta2) * grads[n] ** 2
            moments[n] = (m, v)
            if params[n].dim() >= 2:
                params[n] = params[n] * (1 - lr * decay)
            params[n] = params[n] - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
        trainer.train_step(step)
        state = trainer.optimizer.state
        for n, p in trainer.objective.named_parameters():
            torch.testing.assert_close(state[p]["exp_avg"].double(), moments[n][0], atol=1e-9, rtol=1e-4, msg=n)
            torch.testing.assert_close(state[p]["exp_avg_sq"].double(), moments[n][1], atol=1e-12, rtol=1e-4, msg=n)
            torch.testing.assert_close(p.detach().double(), params[n], atol=2e-6, rtol=0, msg=n)
    assert clipped == [True, True]                     # the clip did bind
    assert any(p.dim() < 2 for p in params.values())   # and there were vectors to leave undecayed


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(schedule):
    cfg = Config().train
    cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule = 1.0, 0.1, 10, 110, schedule
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)        # linear warmup
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    if schedule == "constant":
        assert all(x == 1.0 for x in lrs[10:])
    else:
        assert lrs[10] == pytest.approx(1.0) and lrs[110] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                 # monotone decay
        middle = lrs[60]
        assert middle == pytest.approx(0.55)  # both reach the midpoint of lr and min_lr halfway
        if schedule == "cosine":
            assert lrs[35] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_compiled_trainer_saves_plain_weights(tmp_path, prepared, tokenizer, monkeypatch):
    """Under compile=True the checkpoint holds the plain module's weights, which load strictly
    into a fresh, uncompiled objective (no `_orig_mod.` prefixes from torch.compile's wrapper).
    The "eager" backend keeps this fast and needs no C++ compiler; the wrapper is the same."""
    real_compile, calls = torch.compile, []

    def eager_compile(model, **kw):
        calls.append(model)
        return real_compile(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=2, compile=True)
    trainer = make_trainer(cfg, prepared, tokenizer)
    assert calls == [trainer.objective] and trainer.model is not trainer.objective
    assert any(k.startswith("_orig_mod.") for k in trainer.model.state_dict())  # what must not be saved
    initial = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    trainer.peak_flops = 1e9  # skip measuring the matmul peak (only the MFU column uses it)
    trainer.fit(until=1)
    state = load_checkpoint(os.path.join(tmp_path, "ckpt-00000001.pt"))
    fresh = CausalLM(cfg.model, tokenizer)
    fresh.load_state_dict(state["model"], strict=True)
    trained = trainer.objective.state_dict()
    assert set(fresh.state_dict()) == set(trained)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(trained["backbone.tok_emb.weight"], initial["backbone.tok_emb.weight"])  # it trained
    torch._dynamo.reset()  # no eager-backend code cached for later tests that compile for real


def test_bf16_autocast_on_cpu_trains(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=30, lr=3e-3, min_lr=3e-4, dtype="bf16")
    trainer = make_trainer(cfg, prepared, tokenizer)
    assert trainer.dtype == torch.bfloat16
    trainer.peak_flops = 1e9  # skip measuring the bf16 matmul peak (slow on CPU; only MFU uses it)
    losses = trainer.fit()
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(tokenizer.vocab_size) - 0.3           # about uniform at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 0.8, losses
    # autocast really ran in bf16: the first step's loss (before any update, same weights and
    # batch) differs from the fp32 one, but only by rounding
    fp32 = make_trainer(make_config(tmp_path / "fp32", tokenizer.vocab_size, dtype="fp32"), prepared, tokenizer)
    fp32_first = float(fp32.accumulate_gradients(0))
    assert losses[0] != fp32_first and abs(losses[0] - fp32_first) < 0.05, (losses[0], fp32_first)


def test_deterministic_flag_sets_global_state(tmp_path, prepared, tokenizer, monkeypatch):
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        make_trainer(make_config(tmp_path, tokenizer.vocab_size, deterministic=True), prepared, tokenizer)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")  # the values cuBLAS accepts
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")                  # a user's choice is kept
        make_trainer(make_config(tmp_path, tokenizer.vocab_size, deterministic=True), prepared, tokenizer)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_mfu_never_reads_above_one_when_the_startup_peak_was_measured_on_a_busy_machine(tmp_path, prepared,
                                                                                        tokenizer, monkeypatch):
    """A peak measured low (the machine busy at start-up) gave "MFU 119%". The first interval that
    beats it measures the peak again, once, with a one-line note; the peak is then never below what
    the run reached, so every logged MFU is at most 1. An honest peak is left alone: MFU is the
    model's FLOP/s over it, and nothing is measured again."""
    import minilm.trainer
    measured = []
    monkeypatch.setattr(minilm.trainer, "measure_peak_flops", lambda device, dtype: measured.append(1) or 2.0)
    cfg = make_config(tmp_path / "busy", tokenizer.vocab_size, max_steps=4, log_every=1)
    lines = []
    trainer = make_trainer(cfg, prepared, tokenizer)
    trainer.log = lines.append
    trainer.peak_flops = 1.0   # far below what any model reaches
    trainer.fit()
    mfus = [float(line.split("MFU ")[1].split("%")[0]) for line in lines if "MFU " in line]
    notes = [line for line in lines if line.startswith("note: the matmul peak measured at start-up (0.0 GFLOP/s)")]
    assert len(mfus) == 4 and max(mfus) <= 100.0 and mfus[0] == 100.0, lines
    assert len(notes) == 1 and measured == [1] and "\n" not in notes[0]
    honest = make_trainer(make_config(tmp_path / "quiet", tokenizer.vocab_size, max_steps=2, log_every=1),
                          prepared, tokenizer)
    honest.peak_flops = 1e18
    assert honest.utilization(3e15) == pytest.approx(3e-3) and honest.peak_flops == 1e18 and measured == [1]
