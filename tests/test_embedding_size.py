"""Factorized embeddings (ALBERT/ELECTRA, --embedding_size E < n_embd, minilm/model.py): shapes,
parameter and FLOP counts, the unfactorized model unchanged, decoding, learning, and rtd's shared
E-wide tables."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from minilm import model as model_module
from minilm.config import ModelConfig, ObjectiveConfig, TrainConfig
from minilm.errors import UserError
from minilm.flops import matmul_weights
from minilm.model import KVCache, Transformer
from minilm.objectives import build_objective
from minilm.tokenizer import NUM_SPECIAL
from minilm.trainer import build_optimizer
from tests.test_flops import formula_over_count
from tests.test_model import expected_num_params

pytestmark = pytest.mark.usefixtures("one_thread")

V = NUM_SPECIAL + 64
CFG = ModelConfig(vocab_size=V, seq_len=16, n_layer=2, n_head=4, n_embd=32, embedding_size=8)


def ids(B=2, T=16, seed=0):
    return torch.randint(NUM_SPECIAL, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config
def test_embedding_size_wider_than_the_model_is_refused():
    with pytest.raises(UserError, match=r"embedding_size \(64\) must be 0 \(= n_embd\) or at most n_embd \(32\)"):
        dataclasses.replace(CFG, embedding_size=64).validate()
    with pytest.raises(UserError, match="embedding_size"):
        dataclasses.replace(CFG, embedding_size=-1).validate()
    dataclasses.replace(CFG, embedding_size=32).validate()      # == n_embd: allowed, unfactorized


# ----------------------------------------------------------------------------- shapes and counts
def factorized_num_params(cfg: ModelConfig) -> int:
    """Closed form: the unfactorized count with every table E wide instead of C, the embedding
    norm at E, plus embed_project (E -> C) and, tied, head_project (C -> E)."""
    C, E, b = cfg.n_embd, cfg.embedding_size, 1 if cfg.bias else 0
    rows = cfg.vocab_size + cfg.n_segment + (cfg.seq_len if cfg.position == "learned" else 0)
    n = expected_num_params(cfg) - rows * C + rows * E           # the tables at E
    if cfg.embed_norm:
        n += E + (b * E if cfg.norm == "layernorm" else 0)
    n += E * C + b * C                                           # embed_project
    if cfg.tie_embeddings:
        n += C * E + b * E                                       # head_project
    return n


VARIANTS = {
    "defaults": {},
    "learned-segments-norm": dict(position="learned", n_segment=2, embed_norm=True),
    "layernorm-bias-embed-norm": dict(norm="layernorm", bias=True, embed_norm=True),
    "untied": dict(tie_embeddings=False, position="learned"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_parameter_count(variant):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    torch.manual_seed(0)
    model = Transformer(cfg)
    E, C = cfg.embedding_size, cfg.n_embd
    assert model.tok_emb.weight.shape == (V, E)
    assert model.embed_project.weight.shape == (C, E)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == factorized_num_params(cfg)
    x = ids()
    hidden = model(x)
    assert model.embed(x).shape == hidden.shape == (2, 16, C)
    logits = model.logits(hidden)
    assert logits.shape == (2, 16, V)
    if cfg.tie_embeddings:
        assert model.output_weight is model.tok_emb.weight and model.head_project.weight.shape == (E, C)
        torch.testing.assert_close(logits, model.head_project(hidden) @ model.tok_emb.weight.T)
    else:
        assert model.head_project is None and model.output_weight.shape == (V, C)


def test_flops_per_token_counts_the_projections(monkeypatch):
    """objective.flops_per_token() against torch's FlopCounterMode (tests/test_flops.py), here with
    E = 96 < C = 128. Unfactorized these ratios are 0.998 (mlm) to 1.009 (rtd): norms and biases.
    Leaving either projection out puts a ratio 0.5 to 3% lower, below the band. (prefix_lm's
    formula is an expectation over its random split, too loose for one batch to check this.)"""
    monkeypatch.setattr(model_module, "attention", model_module.attention_math)
    ratios = {f"{name} {changes}": formula_over_count(name, embedding_size=96, **changes)
              for name, changes in (("clm", {}), ("clm", dict(tie_embeddings=False)), ("mlm", {}), ("rtd", {}))}
    assert all(0.997 <= ratio < 1.01 for ratio in ratios.values()), ratios


def test_matmul_weights_counts_both_projections():
    model = Transformer(CFG)
    C, E = CFG.n_embd, CFG.embedding_size
    blocks_and_norm = sum(p.numel() for p in model.blocks.parameters()) + model.norm.weight.numel()
    assert matmul_weights(model, lm_head=False) == blocks_and_norm + E * C
    assert matmul_weights(model, lm_head=True) == blocks_and_norm + E * C + C * E + V * E


# ----------------------------------------------------------------------------- unfactorized unchanged
@pytest.mark.parametrize("name", ["clm", "mlm", "rtd"])
def test_embedding_size_equal_to_n_embd_is_the_old_model(name):
    def state(embedding_size):
        torch.manual_seed(0)
        return build_objective(name, dataclasses.replace(CFG, embedding_size=embedding_size)).state_dict()
    old, same = state(0), state(32)
    assert list(old) == list(same)
    assert not any("head_project" in key or "backbone.embed_project" in key for key in old)
    for key in old:
        assert torch.equal(old[key], same[key]), key       # same shapes, same initialization


# ----------------------------------------------------------------------------- decoding
@torch.no_grad()
def test_kv_cache_decoding_equals_full_recompute():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CFG, position="learned")).eval()
    x = ids(seed=3)
    cache = KVCache(model.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    hidden = model(x[:, :4], cache=cache)
    for t in range(4, 16):
        hidden = model(x[:, t:t + 1], cache=cache, mask=None)
        full = model.logits(model(x[:, :t + 1]))[:, -1]
        torch.testing.assert_close(model.logits(hidden)[:, -1], full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- training
def every_parameter_gets_a_gradient(objective, batch):
    loss, _ = objective(batch)
    loss.backward()
    return [name for name, p in objective.named_parameters() if p.grad is None]


@pytest.mark.parametrize("name", ["mlm", "rtd", "clm"])
def test_no_weight_is_left_without_a_gradient(name):
    """DDP refuses parameters that no loss reaches: a factorized backbone's head_project must be
    used by the masked LM's head and must not exist on rtd's discriminator."""
    torch.manual_seed(0)
    objective = build_objective(name, CFG)
    raw = torch.randint(NUM_SPECIAL, V, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    assert every_parameter_gets_a_gradient(objective, batch) == []


@pytest.mark.parametrize("name", ["clm", "rtd"])
def test_a_tiny_factorized_model_learns(name):
    """Rows of one repeated token: clm learns to copy, rtd's generator to fill the row's token in
    (which needs the token embeddings: the discriminator alone lowers rtd's loss by learning the
    share of replaced tokens). Blind to the tokens, the best either can do is log(64) = 4.16 nats
    (64 ordinary ids); each ends more than a nat below (measured: clm 1.9, rtd's generator 2.9)."""
    torch.manual_seed(0)
    objective = build_objective(name, dataclasses.replace(CFG, embedding_size=16))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-2)
    nll = []     # per predicted token: clm's loss, rtd's generator loss
    for step in range(80):
        g = torch.Generator().manual_seed(step)
        rows = torch.randint(NUM_SPECIAL, V, (16, 1), generator=g).expand(16, 17).clone()
        loss, sums = objective(objective.make_batch(rows, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        nll.append(loss.item() if name == "clm" else (sums["generator/nll"] / sums["generator/targets"]).item())
    end = sum(nll[-5:]) / 5
    assert end < math.log(V - NUM_SPECIAL) - 1, nll


# ----------------------------------------------------------------------------- rtd's shared tables
def test_rtd_shares_the_e_wide_tables_once_and_each_network_projects_them():
    cfg = dataclasses.replace(CFG, position="learned", n_segment=2)
    torch.manual_seed(0)
    objective = build_objective("rtd", cfg, None, ObjectiveConfig())
    gen, disc = objective.generator, objective.backbone
    for table in ("tok_emb", "pos_emb", "seg_emb", "embed_norm"):
        assert getattr(gen, table).weight is getattr(disc, table).weight, table
    assert disc.tok_emb.weight.shape == (V, 8) and disc.embed_norm.weight.shape == (8,)
    assert disc.embed_project.weight.shape == (32, 8)              # E -> C
    assert gen.cfg.n_embd == 8 and gen.embed_project is None        # C_g == E: reads the tables as they are
    assert objective.generator_head.dense.weight.shape == (8, gen.cfg.n_embd)   # C_g -> E
    optimizer = build_optimizer(objective, TrainConfig(), torch.device("cpu"))
    in_groups = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups)) == len({id(p) for p in objective.parameters()})
    assert in_groups.count(id(disc.tok_emb.weight)) == 1


def test_rtd_generator_narrower_than_the_tables_projects_down():
    """ELECTRA-Small's case: E = 128 tables, a 64-wide generator reads them through 128 -> 64."""
    cfg = ModelConfig(vocab_size=V, seq_len=16, n_layer=1, n_head=4, n_embd=256, embedding_size=128)
    objective = build_objective("rtd", cfg, None, ObjectiveConfig(generator_fraction=0.25))
    assert objective.generator.cfg.n_embd == 64
    assert objective.generator.embed_project.weight.shape == (64, 128)
    assert objective.generator_head.dense.weight.shape == (128, 64)
    assert objective.backbone.embed_project.weight.shape == (256, 128)


def test_init_from_a_factorized_rtd_checkpoint_into_a_masked_lm():
    """rtd's discriminator has no LM head, so no head_project: a masked LM started from it takes
    the whole backbone and starts its head, C -> E projection included, from scratch."""
    from minilm.config import Config
    from tests.conftest import load_script
    train_script = load_script("train.py")
    torch.manual_seed(0)
    parent = build_objective("rtd", CFG)
    parent_cfg = Config(model=CFG)
    parent_cfg.train.objective = "rtd"
    state = {"model": parent.state_dict(), "config": parent_cfg.to_dict(), "objective": "rtd", "step": 5}
    child = build_objective("mlm", CFG)
    train_script.load_parent_weights(child, state, "parent.pt", log=lambda *_: None)
    for key, value in parent.backbone.state_dict().items():
        assert torch.equal(child.backbone.state_dict()[key], value), key
