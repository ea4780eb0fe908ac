"""minilm rows for the shared peer benchmark (../shared/bench/peers.py --plugin benchmarks/peers_plugin.py).

Every row goes through the harness's own h.run_train / h.time_generate, so minilm gets exactly the
peers' warm-up, timing, thread count, seeds, AdamW (h.make_adamw: lr 3e-4, betas 0.9/0.95, decay 0.1
on matrices), FLOP count, MFU and load check. Nothing here times anything itself.

Rows (see benchmarks/README.md):
  gpt-minilm            CausalLM, GPT-2's architecture (learned positions, LayerNorm, biases, GELU), fp32
  gpt-minilm-rope       CausalLM, minilm's defaults (RoPE, RMSNorm, no biases, GELU), fp32
  bf16-minilm           gpt-minilm under torch.autocast('cpu', bfloat16)       (peer: bf16-hf-sdpa)
  bf16-minilm-rope      gpt-minilm-rope under torch.autocast('cpu', bfloat16)
  gen-minilm            minilm.generate.generate, KV cache, 1 sequence          (peer: gen-hf-cache)
  gen-minilm-rope       the same with minilm's defaults
  gen-minilm-nocache    use_cache=False                                         (peer: gen-hf-nocache)
Group `minilm` = all of them.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

# Import minilm from this checkout even when it is not pip-installed in the peers venv.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from minilm.config import ModelConfig  # noqa: E402
from minilm.generate import generate  # noqa: E402
from minilm.objectives.clm import CausalLM  # noqa: E402

# GPT-2's block (what gpt-hf-sdpa runs): learned absolute positions, LayerNorm with bias, biases in
# every linear, GELU (minilm: exact erf GELU; HF: gelu_new, the tanh approximation; same FLOPs),
# tied LM head, eps 1e-5.
GPT2_ARCH = dict(position="learned", norm="layernorm", bias=True, mlp="gelu")
# minilm's defaults: RoPE, RMSNorm, no biases, GELU, tied LM head.
MINILM_ARCH = dict(position="rope", norm="rmsnorm", bias=False, mlp="gelu")


def model_config(h, arch: dict) -> ModelConfig:
    c = h.CFG
    cfg = ModelConfig(vocab_size=c["vocab"], seq_len=c["seq_len"], n_layer=c["n_layer"], n_head=c["n_head"],
                      n_embd=c["d_model"], dropout=c["dropout"], tie_embeddings=True, **arch)
    cfg.validate()
    return cfg


def build(h, arch: dict):
    """The CausalLM objective (backbone + tied head) and its parameter counts, counted as the
    harness counts GPT2: all unique params, minus the position table for n_nonemb."""
    cfg = model_config(h, arch)
    obj = CausalLM(cfg)
    pos = [obj.backbone.pos_emb.weight] if obj.backbone.pos_emb is not None else []
    n_total, n_nonemb = h.nparams(obj, pos)
    assert n_nonemb == obj.backbone.num_params(non_embedding=True), (n_nonemb, obj.backbone.num_params(True))
    return obj, cfg, n_total, n_nonemb


def _train(h, args, name: str, arch: dict, autocast_dtype=None):
    torch.manual_seed(0)  # as every peer does before building its model
    obj, cfg, n_total, n_nonemb = build(h, arch)
    xy = h.lm_batch_fn()  # the peers' token stream: x = raw[:, :-1], y = raw[:, 1:] of a (B, T+1) window

    def batch_fn():
        x, y = xy()
        raw = torch.cat([x, y[:, -1:]], dim=1)  # back to the (B, T+1) window minilm's data yields
        return obj.make_batch(raw)              # input_ids = x, labels = y (what the trainer does)

    def loss_fn(model, batch):
        loss, _sums = model(batch)              # the objective's forward, metric sums included
        return loss

    tokens = h.CFG["batch"] * h.CFG["seq_len"]
    return h.run_train(
        name, args, obj, loss_fn, batch_fn, tokens,
        n_nonemb=n_nonemb, n_total=n_total, attn_LHQT=h.LHQT(), autocast_dtype=autocast_dtype,
        extra=dict(
            impl=f"minilm CausalLM (Transformer + tied head), SDPA is_causal; "
                 f"{cfg.position} positions, {cfg.norm}, bias={cfg.bias}, {cfg.mlp} (exact erf)",
            minilm_config=dataclasses.asdict(cfg),
            loss_targets_per_seq=h.CFG["seq_len"],
            note="loss over all T targets (labels = raw[:, 1:]); gpt-hf-* use labels=input_ids, i.e. T-1 "
                 "targets. make_batch is in the 'data' phase; forward also computes the objective's "
                 "metric sums (argmax accuracy, byte counts) as in training."))


def _gen(h, args, name: str, arch: dict, use_cache: bool = True):
    torch.manual_seed(0)
    obj, cfg, _, _ = build(h, arch)
    model = obj.backbone.eval()
    prompt_len = h.PROMPT_LEN
    idx = torch.randint(0, cfg.vocab_size, (1, prompt_len))  # drawn like gen-hf-cache's prompt
    overflow = []

    def g(warm):
        n = 20 if warm else args.new_tokens
        out = generate(model, idx, n, temperature=1.0, top_k=0, top_p=1.0, use_cache=use_cache,
                       warn=overflow.append)
        return out.shape[1] - prompt_len

    r = h.time_generate(
        name, args, g, args.new_tokens,
        extra=dict(impl=f"minilm.generate.generate use_cache={use_cache}, multinomial sampling "
                        f"(temperature 1, top_k 0, top_p 1 = gen-hf-*'s do_sample top_k=0); "
                        f"{cfg.position} positions, {cfg.norm}, bias={cfg.bias}",
                   prompt_len=prompt_len, minilm_config=dataclasses.asdict(cfg)))
    # prompt + new tokens past seq_len makes minilm drop the cache (sliding window): not comparable
    r["context_overflow"] = bool(overflow)
    return r


def register(registry, h):
    registry["gpt-minilm"] = lambda args: _train(h, args, "gpt-minilm", GPT2_ARCH)
    registry["gpt-minilm-rope"] = lambda args: _train(h, args, "gpt-minilm-rope", MINILM_ARCH)
    registry["bf16-minilm"] = lambda args: _train(h, args, "bf16-minilm", GPT2_ARCH, torch.bfloat16)
    registry["bf16-minilm-rope"] = lambda args: _train(h, args, "bf16-minilm-rope", MINILM_ARCH, torch.bfloat16)
    registry["gen-minilm"] = lambda args: _gen(h, args, "gen-minilm", GPT2_ARCH)
    registry["gen-minilm-rope"] = lambda args: _gen(h, args, "gen-minilm-rope", MINILM_ARCH)
    registry["gen-minilm-nocache"] = lambda args: _gen(h, args, "gen-minilm-nocache", GPT2_ARCH, use_cache=False)
    h.GROUPS["minilm"] = ["gpt-minilm", "gpt-minilm-rope", "bf16-minilm", "bf16-minilm-rope",
                          "gen-minilm", "gen-minilm-rope", "gen-minilm-nocache"]
