"""minilm/optim.py: Muon's update is orthogonalized Nesterov momentum, the parameter groups are
the documented ones, a Muon run resumes bitwise and accumulates exactly, wsd's closed form, and
the auto warmup that lets a short run start."""
from __future__ import annotations

import math
import os

import pytest
import torch

from minilm.config import Config, ModelConfig, parse_overrides
from minilm.errors import UserError
from minilm.objectives import build_objective, model_config_for
from minilm.optim import MuonWithAdamW, build_optimizer, lr_at
from tests.test_trainer import RaggedCLM, SlicedSource, make_config, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")
A, B, C = 3.4445, -4.7750, 2.0315                       # the quintic's coefficients (REFERENCES.md)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic of Muon's reference, written out in fp32 (what minilm's Muon runs on a CPU): on the
    wide orientation, from G / |G|_F, X <- a X + (b A + c A^2) X with A = X X^T."""
    x = g.float()
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if tall else x


def well_conditioned(rows: int, cols: int, seed: int) -> torch.Tensor:
    """U diag(s) V^T with singular values spread evenly over [1, 2]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    return u @ torch.diag(torch.linspace(1.0, 2.0, k)) @ v.T


def tiny_clm(tie=True):
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie)
    return cfg, build_objective("clm", cfg.model, None)


# ----------------------------------------------------------------------------- (1) the update
def test_muon_update_is_orthogonalized_nesterov_momentum():
    """Two steps on one block matrix from known gradients: (W_before - W_after) / lr_eff is the
    Newton-Schulz of the Nesterov momentum computed by hand, its singular values in the quintic's
    band, and close in direction to the exact orthogonalization U V^T; the gradient itself was not."""
    cfg, objective = tiny_clm()
    cfg.train.optimizer, cfg.train.lr, cfg.train.muon_lr, cfg.train.weight_decay = "muon", 1e-3, 2e-2, 0.0
    opt = build_optimizer(objective, cfg.train, torch.device("cpu"))
    assert isinstance(opt, MuonWithAdamW)
    for group in opt.param_groups:
        group["lr"] = cfg.train.lr * group["lr_scale"]
    w = objective.backbone.blocks[0].attn.qkv.weight                     # (3C, C): tall, so transposed
    rows, cols = w.shape
    lr_eff = cfg.train.muon_lr * 0.2 * math.sqrt(max(rows, cols))       # match_rms_adamw
    momentum, buf = cfg.train.muon_momentum, torch.zeros_like(w)
    for step, seed in enumerate((1, 2)):
        grad = well_conditioned(rows, cols, seed)
        before = w.detach().clone()
        opt.zero_grad(set_to_none=True)
        w.grad = grad.clone()                                           # the only gradient: nothing else moves
        opt.step()
        update = (before - w.detach()) / lr_eff
        buf = momentum * buf + (1 - momentum) * grad
        nesterov = (1 - momentum) * grad + momentum * buf
        by_hand = newton_schulz(nesterov)
        # the same fp32 arithmetic in another order: equal to rounding
        torch.testing.assert_close(update, by_hand, atol=2e-5, rtol=0)
        s = torch.linalg.svdvals(update)
        # REFERENCES.md's band, "about [0.68, 1.20]" (bf16 reached 0.6799 on this matrix)
        assert 0.65 <= s.min() and s.max() <= 1.2, (step, s.min(), s.max())
        u, _, vt = torch.linalg.svd(nesterov, full_matrices=False)
        cosine = torch.nn.functional.cosine_similarity(update.flatten(), (u @ vt).flatten(), dim=0)
        assert cosine > 0.9, cosine
        sg = torch.linalg.svdvals(grad)
        assert sg.max() / sg.min() > 1.9                                # the gradient's spread, gone in the update
        assert s.max() / s.min() < sg.max() / sg.min()
    # the other block matrices had no gradient and stayed put; the second step used the momentum
    assert not torch.allclose(newton_schulz(nesterov), newton_schulz(grad), atol=2e-2)


def test_minilm_muon_in_bf16_is_torch_optim_muon():
    """minilm/muon.py with its Newton-Schulz in bf16 takes exactly torch.optim.Muon's steps
    (match_rms_adamw, Nesterov, decoupled decay): the same algorithm, only the CPU's dtype differs."""
    from minilm.muon import Muon
    torch.manual_seed(0)
    ours_w = torch.nn.Parameter(torch.randn(48, 16))
    theirs_w = torch.nn.Parameter(ours_w.detach().clone())
    start = ours_w.detach().clone()
    ours = Muon([ours_w], lr=0.02, weight_decay=0.1, momentum=0.95, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([theirs_w], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    for seed in range(3):
        grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(seed))
        ours_w.grad, theirs_w.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(ours_w.detach(), theirs_w.detach(), atol=1e-6, rtol=0)
    assert (ours_w.detach() - start).abs().max() > 1e-3        # three real steps were taken
    with pytest.raises(ValueError, match="2-D matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


# ----------------------------------------------------------------------------- (2) the groups
def objective_for(name, tokenizer):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=2, n_head=2, n_embd=32,
                            tie_embeddings=name != "mlm")
    if name == "classify":
        cfg.obj.labels = '["a", "b"]'
        cfg.obj.head_lr = 1e-2
    cfg.model = model_config_for(name, cfg.model, cfg.obj)
    torch.manual_seed(0)
    return cfg, build_objective(name, cfg.model, tokenizer, cfg.obj)


@pytest.mark.parametrize("name", ["clm", "mlm", "t5", "classify"])
def test_muon_groups_are_the_block_matrices_exactly(name, tokenizer):
    cfg, objective = objective_for(name, tokenizer)
    cfg.train.optimizer = "muon"
    cfg.train.embedding_lr, cfg.train.lm_head_lr = 3e-3, 4e-3
    opt = build_optimizer(objective, cfg.train, torch.device("cpu"))
    names = {id(p): n for n, p in objective.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert not muon & adamw and muon | adamw == set(names.values())
    # every block matrix (attention qkv/proj, cross-attention, MLP up/down) is under Muon ...
    expected = {n for n, p in objective.named_parameters()
                if ".blocks." in n and p.dim() == 2 and n.endswith(".weight")}
    assert muon == expected, sorted(muon ^ expected)
    kinds = {n.split(".blocks.")[1].split(".", 2)[1] + "." + n.rsplit(".", 2)[1] for n in muon}
    assert {"attn.qkv", "attn.proj", "mlp.up", "mlp.down"} <= kinds
    if name == "t5":
        assert any("cross" in n for n in muon), sorted(muon)     # the decoder's cross-attention
    # ... and no norm, bias, embedding, LM head or objective head is
    for n in muon:
        assert not any(word in n for word in ("norm", "bias", "emb", "lm_head", "head", "pooler")), n
    # each AdamW group's lr: the tables at --embedding_lr, an untied LM head at --lm_head_lr,
    # classify's head at its --head_lr, the rest at --lr
    scale_of = {names[id(p)]: g["lr_scale"] for g in opt.adamw.param_groups for p in g["params"]}
    for n, scale in scale_of.items():
        lr = cfg.train.lr * scale
        if n.endswith("_emb.weight"):
            assert lr == pytest.approx(3e-3), n
        elif n.endswith("lm_head.weight"):
            assert lr == pytest.approx(4e-3), n
        elif name == "classify" and ("label_head" in n or "pooler" in n):
            assert lr == pytest.approx(1e-2), n
        else:
            assert lr == pytest.approx(cfg.train.lr), n
    if name == "mlm":
        assert "backbone.lm_head.weight" in scale_of                    # untied here: its own lr was tested
    assert all(g["lr_scale"] == pytest.approx(1.0) for g in opt.muon.param_groups)   # muon_lr 0 = --lr


def test_adamw_default_groups_unchanged_and_lrs_apply(tokenizer):
    """The default is the one AdamW of before (two groups); --embedding_lr alone adds a group."""
    cfg, objective = tiny_clm(tie=False)
    opt = build_optimizer(objective, cfg.train, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 2
    cfg.train.embedding_lr = 1e-2
    opt = build_optimizer(objective, cfg.train, torch.device("cpu"))
    assert len(opt.param_groups) == 3
    assert opt.param_groups[2]["params"] == [objective.backbone.tok_emb.weight]
    assert opt.param_groups[2]["lr_scale"] * cfg.train.lr == pytest.approx(1e-2)


def test_muon_with_fsdp_is_a_one_line_error():
    cfg, objective = tiny_clm()
    cfg.train.optimizer, cfg.train.fsdp = "muon", True
    with pytest.raises(UserError, match="--fsdp"):
        build_optimizer(objective, cfg.train, torch.device("cpu"))
    with pytest.raises(UserError, match=r"^--optimizer muon orthogonalizes whole matrices, and --fsdp shards them"):
        parse_overrides(["--optimizer", "muon", "--fsdp"])              # at parse time, before any data


# ----------------------------------------------------------------------------- (3) resume, (4) accumulation
def test_muon_resume_is_bitwise_exact(tmp_path, prepared, tokenizer):
    def config(out):
        cfg = make_config(out, tokenizer.vocab_size, max_steps=12, optimizer="muon", muon_lr=1e-2,
                          embedding_lr=3e-3, schedule="wsd")
        cfg.model.dropout = 0.1
        return cfg

    straight = make_trainer(config(tmp_path / "a"), prepared, tokenizer)
    straight.fit()
    first = make_trainer(config(tmp_path / "b"), prepared, tokenizer)
    first.fit(until=6)
    torch.manual_seed(12345)
    second = make_trainer(config(tmp_path / "b"), prepared, tokenizer)
    second.load(os.path.join(tmp_path / "b", "ckpt-00000006.pt"))
    second.fit()
    for (n, a), b in zip(straight.objective.state_dict().items(), second.objective.state_dict().values()):
        assert torch.equal(a, b), n
    # and the momentum buffers came back: a fresh Muon state would have moved the weights otherwise
    third = make_trainer(config(tmp_path / "b"), prepared, tokenizer)
    state = torch.load(os.path.join(tmp_path / "b", "ckpt-00000006.pt"), weights_only=False)
    third.objective.load_state_dict(state["model"])
    third.step = 6
    third.fit()
    w = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(third.objective.state_dict()[w], straight.objective.state_dict()[w])


def test_adamw_checkpoint_into_a_muon_run_is_a_one_line_error(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=2)
    make_trainer(cfg, prepared, tokenizer).fit()
    cfg.train.optimizer = "muon"
    with pytest.raises(UserError, match="does not fit"):
        make_trainer(cfg, prepared, tokenizer).load(os.path.join(tmp_path, "ckpt-00000002.pt"))


def test_muon_step_with_accumulation_equals_one_big_batch(tmp_path, prepared, tokenizer):
    """2 micro-batches of 6 rows == 1 of 12, through a whole Muon + AdamW step."""
    from minilm.data import BlockSource
    big = BlockSource(prepared[0], "train", 32, 12, seed=3).batch(0)

    def weights_after_step(accum):
        cfg = make_config(tmp_path, tokenizer.vocab_size, grad_accum=accum, batch_size=12 // accum,
                          optimizer="muon", warmup_steps=0, lr=1e-2)
        torch.manual_seed(0)
        objective = RaggedCLM(cfg.model, tokenizer)
        from minilm.trainer import Trainer
        trainer = Trainer(cfg, objective, SlicedSource(big, 12 // accum), None, tokenizer, log=lambda *_: None)
        before = {n: p.detach().clone() for n, p in objective.named_parameters()}
        trainer.train_step(0)
        return before, {n: p.detach().clone() for n, p in objective.named_parameters()}

    before, one = weights_after_step(1)
    _, two = weights_after_step(2)
    for n in one:
        assert torch.allclose(one[n], two[n], atol=1e-6), n
    w = "backbone.blocks.0.mlp.up.weight"
    assert (one[w] - before[w]).abs().max() > 1e-3                      # the step did move it


# ----------------------------------------------------------------------------- (5) schedule, warmup
def test_wsd_at_named_steps_is_the_closed_form():
    cfg = Config().train
    cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule, cfg.decay_fraction = 1.0, 0.1, 10, 110, "wsd", 0.2
    decay_start = 110 - 22                                              # the last 20% of 110 steps
    assert lr_at(9, cfg) == pytest.approx(1.0)                          # warmup's end
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(49, cfg) == 1.0 and lr_at(decay_start - 1, cfg) == 1.0  # mid stable, the stable's last
    assert lr_at(decay_start, cfg) == 1.0                               # the decay starts from --lr
    assert lr_at(decay_start + 11, cfg) == pytest.approx(1.0 - 0.9 * 11 / 22)
    assert lr_at(109, cfg) == pytest.approx(1.0 - 0.9 * 21 / 22)        # the last step
    assert lr_at(110, cfg) == pytest.approx(0.1)                        # min_lr at max_steps
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_auto_warmup_follows_short_runs():
    assert parse_overrides(["--max_steps", "50"]).train.warmup_steps == 10
    assert parse_overrides([]).train.warmup_steps == 100                # the default run: unchanged
    assert parse_overrides(["--max_steps", "600"]).train.warmup_steps == 100
    assert parse_overrides(["--max_steps", "50", "--warmup_steps", "auto"]).train.warmup_steps == 10
    assert parse_overrides(["--max_steps", "50", "--warmup_steps", "7"]).train.warmup_steps == 7
    with pytest.raises(UserError, match=r"^--warmup_steps must be at most --max_steps \(50\), got 100: .*"
                                        r"pass --warmup_steps 50 or less$"):
        parse_overrides(["--max_steps", "50", "--warmup_steps", "100"])
    # a config built in code (no validate) gets the same number from the Trainer's schedule
    cfg = Config().train
    cfg.max_steps = 50
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 10) and lr_at(9, cfg) == pytest.approx(cfg.lr)


def test_auto_warmup_with_epochs_follows_the_steps_the_data_gives(prepared, tmp_path, tokenizer):
    """--epochs: max_steps is known only once the data is, and so is the auto warmup."""
    from minilm.data import BlockSource
    from minilm.epochs import read_in_passes, steps_for_epochs
    from minilm.config import auto_warmup
    cfg = make_config(tmp_path, tokenizer.vocab_size, epochs=1, warmup_steps=-1)
    cfg.train.validate()
    assert cfg.train.warmup_steps == -1                                 # still auto: the steps are unknown
    source = BlockSource(prepared[0], "train", 32, 8)
    read_in_passes(cfg, source, 1, set(), lambda _: None)
    steps = steps_for_epochs(1, source.epoch_size(), 8)
    assert cfg.train.max_steps == steps and cfg.train.warmup_steps == auto_warmup(steps) == min(100, steps // 5)
