"""minilm against Hugging Face GPT-2 on a CUDA GPU: training tokens/s at GPT-2 small's shape.

The CPU harness (../shared/bench/peers.py) measures CPU only; this is its GPU counterpart for the
one comparison a GPU user asks first. Same model shape (12 layers, 12 heads, 768 wide, learned
positions, tied embeddings), vocab 8192, seq_len 1024, batch 16, bf16 autocast, fused AdamW,
dropout 0; one step = forward, loss, backward, optimizer step on a fixed random batch. Eager, then
torch.compile for both. Run on a machine with transformers installed (a benchmark-only peer):
    python benchmarks/gpu_peers.py [--steps 30] [--compile]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilm.config import ModelConfig
from minilm.model import CAUSAL, Transformer

V, T, B, L, H, C = 8192, 1024, 16, 12, 12, 768


def minilm_model():
    cfg = ModelConfig(vocab_size=V, seq_len=T, n_layer=L, n_head=H, n_embd=C, dropout=0.0, position="learned",
                      mlp="gelu", norm="layernorm", bias=True)
    model = Transformer(cfg)

    def loss_fn(ids):
        hidden = model(ids[:, :-1], mask=CAUSAL)
        logits = model.logits(hidden)
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return model, loss_fn


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=V, n_positions=T, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")

    def loss_fn(ids):
        logits = model(input_ids=ids[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return model, loss_fn


def measure(name, build, steps, compile_model):
    torch.manual_seed(0)
    model, loss_fn = build()
    model.cuda().train()
    params = sum(p.numel() for p in model.parameters())
    step_fn = torch.compile(loss_fn) if compile_model else loss_fn
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(0, V, (B, T + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tok_s = steps * B * T / (time.perf_counter() - t0)
    print(f"{name:<28} {params / 1e6:6.1f}M params  {tok_s:>12,.0f} tok/s", flush=True)
    torch.cuda.empty_cache()
    return tok_s


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; B={B} T={T} bf16 autocast")
    for compile_model in (False, True):
        tag = "compiled" if compile_model else "eager"
        ours = measure(f"minilm gpt ({tag})", minilm_model, args.steps, compile_model)
        theirs = measure(f"HF GPT2 sdpa ({tag})", hf_model, args.steps, compile_model)
        print(f"ratio minilm / HF ({tag}): {ours / theirs:.2f}x", flush=True)
