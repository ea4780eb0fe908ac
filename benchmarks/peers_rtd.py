"""Replaced-token detection (ELECTRA) rows for the shared peer benchmark.

    /tmp/peers/bin/python ../shared/bench/peers.py --plugin benchmarks/peers_rtd.py \
        --bench rtd-minilm,electra,bf16-rtd-minilm,bf16-electra --repeats 5

Every row goes through the harness's h.run_train (warm-up, repeats, threads, AdamW, load check), as
in peers_plugin.py. Sizes are those of the harness's `electra` row at its standard config:
discriminator 6 blocks, n_embd 384, 6 heads, MLP 1536; generator 6 blocks, 128 wide (2 heads of
64: --generator_fraction 1/3), MLP 512; shared embeddings 128 wide (--embedding_size 128, the
row's ElectraConfig(embedding_size=128)): projected up to 384 for the discriminator, read as they
are by the 128-wide generator, whose MLM head ends in the tied 128-wide matrix; vocab 8192,
batch 8, 256 tokens, no dropout.

Rows:
  rtd-minilm       minilm's ReplacedTokenDetection objective (minilm's defaults: RoPE, RMSNorm, no
                   biases, GELU; ELECTRA's 85% <mask> / 15% unchanged, loss = gen + 50 x disc),
                   make_batch (masking, sampling noise) inside the step. fp32
  bf16-rtd-minilm  the same under torch.autocast('cpu', bfloat16)
  bf16-electra     the harness's `electra` row, line for line, under the same autocast (the harness
                   has no bf16 ELECTRA row; h.b_electra runs with h.run_train given the autocast)
Differences from the `electra` row that the figures carry: HF's collator masks 100% of the chosen
tokens; minilm 85%. HF's generator head and last layer run at every position, minilm's only at
the chosen ones. (Both factorize the embeddings the same way: 128 wide, projected to 384 for the
discriminator only.)
tokens/s = batch x seq_len per second (the discriminator's input tokens), as the electra row.
"""
from __future__ import annotations

import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from minilm.config import ModelConfig, ObjectiveConfig  # noqa: E402
from minilm.objectives import build_objective  # noqa: E402
from minilm.tokenizer import NUM_SPECIAL  # noqa: E402

GENERATOR_FRACTION = 1 / 3   # 128 of 384, as the electra row's generator
EMBEDDING_SIZE = 128         # the electra row's ElectraConfig(embedding_size=128), shared by both


def rtd_model_config(h) -> ModelConfig:
    c = h.CFG
    return ModelConfig(vocab_size=c["vocab"], seq_len=c["seq_len"], n_layer=c["n_layer"], n_head=c["n_head"],
                       n_embd=c["d_model"], intermediate_size=4 * c["d_model"], dropout=c["dropout"],
                       tie_embeddings=True, embedding_size=EMBEDDING_SIZE)


def _rtd_minilm(h, args, name, autocast_dtype=None):
    torch.manual_seed(0)
    objective = build_objective("rtd", rtd_model_config(h), None,
                                ObjectiveConfig(generator_fraction=GENERATOR_FRACTION))
    c = h.CFG
    data = torch.Generator().manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    def batch_fn():
        raw = torch.randint(NUM_SPECIAL, c["vocab"], (c["batch"], c["seq_len"] + 1), generator=data)
        return objective.make_batch(raw, generator)

    def loss_fn(model, batch):
        loss, _sums = model(batch)
        return loss

    n_total = sum(p.numel() for p in objective.parameters())
    n_discriminator = sum(p.numel() for p in objective.backbone.parameters())
    return h.run_train(name, args, objective, loss_fn, batch_fn, c["batch"] * c["seq_len"], n_nonemb=n_total,
                       n_total=n_total, autocast_dtype=autocast_dtype,
                       extra=dict(impl="minilm ReplacedTokenDetection: disc 6x384 (6 heads, MLP 1536) + gen 6x128 "
                                       "(2 heads, MLP 512), shared embeddings 128 wide (projected to 384 for the "
                                       "discriminator), generator head and last block at the chosen positions only, "
                                       "make_batch inside the step, loss = gen + 50 x disc",
                                  disc_params_total=n_discriminator,
                                  generator_width=objective.generator.cfg.n_embd,
                                  embedding_size=objective.backbone.cfg.embedding_width,
                                  note="tokens/s = discriminator input tokens, as the electra row"))


def _bf16_electra(h, args):
    original = h.run_train

    def run_train(name, *rest, **options):
        return original("bf16-electra", *rest, **dict(options, autocast_dtype=torch.bfloat16))
    h.run_train = run_train          # b_electra looks run_train up in its module when it runs
    try:
        return h.b_electra(args)
    finally:
        h.run_train = original


def register(registry, h):
    registry["rtd-minilm"] = lambda args: _rtd_minilm(h, args, "rtd-minilm")
    registry["bf16-rtd-minilm"] = lambda args: _rtd_minilm(h, args, "bf16-rtd-minilm", torch.bfloat16)
    registry["bf16-electra"] = lambda args: _bf16_electra(h, args)
    h.GROUPS["minilm-rtd"] = ["rtd-minilm", "electra", "bf16-rtd-minilm", "bf16-electra"]
