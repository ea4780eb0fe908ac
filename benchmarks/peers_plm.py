"""Permutation-LM rows for the shared peer benchmark (../shared/bench/peers.py --plugin benchmarks/peers_plm.py).

    /tmp/peers/bin/python ../shared/bench/peers.py --plugin benchmarks/peers_plm.py \
        --bench matmul,plm-minilm,xlnet-plm,bf16-plm-minilm,bf16-xlnet-plm --repeats 5

Every row goes through the harness's h.run_train (warm-up, repeats, threads, AdamW, FLOP count, load
check), as in peers_plugin.py. The config is the harness's standard one: 6 layers, d_model 384, 6
heads, MLP 1536, seq_len 256, batch 8, vocab 8192, fp32 unless the row says bf16.

Rows:
  plm-minilm       minilm's PermutationLM (objectives/plm.py): K = 6 (round(256/6) = 43 targets per row),
                   uniform targets, XLNet-like layers as far as minilm has them (LayerNorm with bias,
                   biases, exact GELU, tied head; RoPE for XLNet's relative positions; pre-norm).
                   make_batch (the order, on tensors) inside the step; the query stream at the 43
                   targets only; fed the peer's rows (h.example_pool) in the peer's order
  bf16-plm-minilm  plm-minilm under torch.autocast('cpu', bfloat16)
  bf16-xlnet-plm   the harness's xlnet-plm (XLNetLMHeadModel + DataCollatorForPermutationLanguageModeling
                   1/6, span 5), line for line, under the same autocast (the harness has no bf16 row)
Peer: the harness's xlnet-plm (fp32), whose query stream runs at all 256 positions (target_mapping
over all T) with relative attention. tokens/s = input tokens (B x T) per second for every row.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from minilm.config import ModelConfig, ObjectiveConfig  # noqa: E402
from minilm.objectives import build_objective  # noqa: E402
from minilm.tokenizer import CLS_ID, NUM_SPECIAL, SEP_ID  # noqa: E402

XLNET_ARCH = dict(position="rope", norm="layernorm", bias=True, mlp="gelu")


def plm_model_config(h) -> ModelConfig:
    c = h.CFG
    cfg = ModelConfig(vocab_size=c["vocab"], seq_len=c["seq_len"], n_layer=c["n_layer"], n_head=c["n_head"],
                      n_embd=c["d_model"], intermediate_size=4 * c["d_model"], dropout=c["dropout"],
                      tie_embeddings=True, **XLNET_ARCH)
    cfg.validate()
    return cfg


def peer_windows(h) -> torch.Tensor:
    """The peer's rows (h.example_pool: <s> w..w </s>) as minilm ids, (64, T): <s>/</s> -> <cls>/<sep>,
    regular ids below NUM_SPECIAL moved up by NUM_SPECIAL (peers_plugin.roberta_windows' mapping)."""
    ids = torch.tensor([ex["input_ids"] for ex in h.example_pool()])
    return torch.where(ids == 0, CLS_ID, torch.where(ids == 2, SEP_ID,
                                                     torch.where(ids < NUM_SPECIAL, ids + NUM_SPECIAL, ids)))


def plm_batch_fn(h, objective):
    """objective.make_batch over the peer's rows, B at a time in the collator's order, one generator
    for the run (a new order every step, as the collator draws one)."""
    windows, B = peer_windows(h), h.CFG["batch"]
    generator = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def fn():
        i = state["i"]
        state["i"] = (i + B) % len(windows)
        rows = windows[[(i + k) % len(windows) for k in range(B)]]
        return objective.make_batch(torch.cat([rows, rows[:, -1:]], dim=1), generator)   # (B, T+1) windows
    return fn


def _plm_minilm(h, args, name: str, autocast_dtype=None):
    torch.manual_seed(0)
    objective = build_objective("plm", plm_model_config(h), None, ObjectiveConfig())
    n_total, n_nonemb = h.nparams(objective)     # RoPE: no position table

    def loss_fn(model, batch):
        loss, _sums = model(batch)
        return loss

    return h.run_train(
        name, args, objective, loss_fn, plm_batch_fn(h, objective), h.CFG["batch"] * h.CFG["seq_len"],
        n_nonemb=n_nonemb, n_total=n_total, attn_LHQT=h.LHQT(), autocast_dtype=autocast_dtype,
        extra=dict(impl=f"minilm PermutationLM: K=6, {objective.num_targets} targets per row, query stream at the "
                        "targets only through the content stream's blocks; make_batch inside the step",
                   minilm_config=dataclasses.asdict(objective.backbone.cfg),
                   minilm_flops_per_token=objective.flops_per_token(),
                   data="the peer's example_pool rows (<s>/</s> -> <cls>/<sep>, ids 5..114 -> +115), same order; "
                        "minilm may pick <cls>/<sep> as targets, the collator never does",
                   note="mfu_formula counts a full LM pass (6N + 12LHQT); minilm runs the query stream and the "
                        "head on 1/6 of the positions and skips the last content block: util_counted is honest"))


def _xlnet_plm_bf16(h, args):
    """The harness's xlnet-plm (b_xlnet_plm), line for line, under bf16 autocast."""
    from transformers import DataCollatorForPermutationLanguageModeling, XLNetConfig, XLNetLMHeadModel
    c = h.CFG
    torch.manual_seed(0)
    tok = h.make_tokenizer()
    coll = DataCollatorForPermutationLanguageModeling(tok, plm_probability=1 / 6, max_span_length=5)
    config = XLNetConfig(vocab_size=c["vocab"], d_model=c["d_model"], n_layer=c["n_layer"], n_head=c["n_head"],
                         d_inner=4 * c["d_model"], ff_activation="gelu", dropout=0.0, mem_len=None,
                         attn_type="bi", pad_token_id=1, bos_token_id=0, eos_token_id=2)
    m = XLNetLMHeadModel(config)
    tot, nonemb = h.nparams(m)

    def loss_fn(model, b):
        return model(input_ids=b["input_ids"], perm_mask=b["perm_mask"],
                     target_mapping=b["target_mapping"], labels=b["labels"]).loss
    return h.run_train("bf16-xlnet-plm", args, m, loss_fn, h.collator_batch_fn(coll), c["batch"] * c["seq_len"],
                       n_nonemb=nonemb, n_total=tot, attn_LHQT=h.LHQT(), autocast_dtype=torch.bfloat16,
                       extra=dict(impl="transformers XLNetLMHeadModel + DataCollatorForPermutationLanguageModeling"
                                       "(1/6, span 5) in loop, under bf16 autocast (xlnet-plm of peers.py; built by "
                                       "the minilm plm plugin)"))


def register(registry, h):
    registry["plm-minilm"] = lambda args: _plm_minilm(h, args, "plm-minilm")
    registry["bf16-plm-minilm"] = lambda args: _plm_minilm(h, args, "bf16-plm-minilm", torch.bfloat16)
    registry["bf16-xlnet-plm"] = lambda args: _xlnet_plm_bf16(h, args)
    h.GROUPS["minilm-plm"] = ["plm-minilm", "xlnet-plm", "bf16-plm-minilm", "bf16-xlnet-plm"]
