"""Translation LM (XLM's TLM) row for the shared peer benchmark, to compare with mlm-minilm.

    /tmp/peers/bin/python ../shared/bench/peers.py --plugin benchmarks/peers_plugin.py \
        --plugin benchmarks/peers_tlm.py --bench mlm-minilm,tlm-minilm --repeats 3

  tlm-minilm   TranslationLM at mlm-minilm's config (RoBERTa's layer shapes, learned positions,
               LayerNorm, biases; 6 x 384, 6 heads, batch 8 x 256, vocab 8192, fp32), on the same
               rows: each of the peer's example_pool rows (<s> w..w </s>, as mlm-minilm reads them)
               is split into a "source", its first 126 words, and a "target", the next 126, laid
               out as <eos> source <eos> <eos> target <eos> (exactly 256 tokens: no padding), with
               the positions restarting at the target and language ids 0/1 (data/parallel.py's
               pack_translation). The layout and make_batch (masking, 15%, 80/10/10) are in the
               step ('data' phase), as mlm-minilm's make_batch is.

It is the same work as mlm-minilm, plus what TLM adds: the (B, T) position and language lookups
and a padding mask (all True here, as rows are full) in attention. 252 maskable tokens per row
against mlm-minilm's 254 (four <eos> against <cls> and <sep>), so ~0.8% fewer predicted tokens.
tokens/s = batch x seq_len per second, as mlm-minilm.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (_ROOT, os.path.join(_ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

from minilm.data.parallel import pack_translation  # noqa: E402
from minilm.objectives import model_config_for  # noqa: E402
from minilm.objectives.tlm import TranslationLM  # noqa: E402
from peers_plugin import ROBERTA_ARCH, model_config, roberta_windows  # noqa: E402


def tlm_batch_fn(h, objective):
    """The peer's rows, B at a time in order (as mlm_batch_fn), each split into a source and a
    target half, packed and masked with one generator for the whole run."""
    windows, B, T = roberta_windows(h), h.CFG["batch"], h.CFG["seq_len"]
    half = (T - 4) // 2
    sources, targets = windows[:, 1:1 + half], windows[:, 1 + half:1 + 2 * half]    # (64, 126) each
    lengths = torch.full((B,), half)
    generator = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def fn():
        i = state["i"]
        state["i"] = (i + B) % len(windows)
        rows = [(i + k) % len(windows) for k in range(B)]
        raw = pack_translation(sources[rows], lengths, targets[rows], lengths, T)
        return objective.make_batch(raw, generator)
    return fn


def _tlm(h, args, name: str):
    torch.manual_seed(0)
    cfg = model_config_for("tlm", model_config(h, ROBERTA_ARCH))   # embed_norm and n_segment 2 (languages)
    obj = TranslationLM(cfg)
    pos = [obj.backbone.pos_emb.weight, obj.backbone.seg_emb.weight]
    n_total, n_nonemb = h.nparams(obj, pos)
    batch_fn = tlm_batch_fn(h, obj)
    predicted = []

    def loss_fn(model, batch):
        predicted.append(len(batch["targets"]))
        loss, _sums = model(batch)
        return loss

    r = h.run_train(
        name, args, obj, loss_fn, batch_fn, h.CFG["batch"] * h.CFG["seq_len"],
        n_nonemb=n_nonemb, n_total=n_total, attn_LHQT=h.LHQT(),
        extra=dict(
            impl="minilm TranslationLM: MaskedLM (sparse head) over <eos> src <eos> <eos> tgt <eos>, positions "
                 "restarting at the target, language (segment) embeddings, padding mask; layout + make_batch "
                 "in the step ('data' phase)",
            minilm_config=dataclasses.asdict(obj.backbone.cfg),
            data="the peer's example_pool rows as mlm-minilm reads them, split into two halves of 126 words",
            note="compare with mlm-minilm in the same invocation: the same model and work"))
    r["predicted_tokens_per_step"] = sum(predicted) / max(1, len(predicted))
    return r


def register(registry, h):
    registry["tlm-minilm"] = lambda args: _tlm(h, args, "tlm-minilm")
    h.GROUPS["minilm-tlm"] = ["mlm-minilm", "tlm-minilm"]
