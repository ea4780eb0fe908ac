#!/usr/bin/env python3
"""SimCSE training throughput: sentences/s and MFU, counting both passes of every sentence.

    python benchmarks/simcse_speed.py                          # CPU, fp32, the bench model
    python benchmarks/simcse_speed.py --device cuda --dtype bf16 --batch_size 64

No peer here (the harness has no contrastive row): the point is the figure itself and a check
that the objective costs what it claims. One timed step is what the trainer does: make_batch
(each sentence twice), forward (one encoder pass over 2B rows, pooling, the training MLP, the
(B, B) InfoNCE), backward, AdamW, zero_grad. Rows are `[CLS] sentence [SEP]` padded to seq_len,
sentence lengths uniform in [seq_len / 4, seq_len - 2] (random ids; speed does not depend on them).

Printed: sentences/s; tokens/s as the trainer counts them (seq_len per sentence, padding
included, each sentence once); MFU = SimCSE.flops_per_token() x tokens/s / measured matmul peak
(minilm/flops.py), flops_per_token counting two encoder passes; and the same model's single
encoder pass (forward, backward and AdamW on B rows: no second view, no InfoNCE) for comparison: a SimCSE
step should take about twice as long. Model: the benchmarks' 6 x 384 (6 heads, seq_len 32 as
SimCSE's max_len, batch 64 as its unsupervised recipe), minilm's defaults, dropout 0.1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minilm.config import ModelConfig, ObjectiveConfig  # noqa: E402
from minilm.data import frame_sentences  # noqa: E402
from minilm.flops import flops_per_token, matmul_weights, measure_peak_flops  # noqa: E402
from minilm.model import padding_mask  # noqa: E402
from minilm.objectives import build_objective  # noqa: E402
from minilm.trainer import DTYPES, autocast, build_optimizer  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--pooling", default="first", choices=["first", "mean"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = ModelConfig(vocab_size=8192, seq_len=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                      n_embd=args.n_embd, dropout=0.1)
    options = ObjectiveConfig(simcse_pooling=args.pooling)
    torch.manual_seed(0)
    objective = build_objective("simcse", cfg, None, options).to(device).train()

    class Train:
        weight_decay, lr, beta1, beta2 = 0.1, 3e-5, 0.9, 0.999
    optimizer = build_optimizer(objective, Train, device)
    g = torch.Generator().manual_seed(0)
    B, T = args.batch_size, args.seq_len
    lengths = torch.randint(T // 4, T - 1, (B,), generator=g)
    ids, lengths = frame_sentences(torch.randint(7, 8192, (B, T - 2), generator=g), lengths, T)
    raw = {"input_ids": ids.to(device), "lengths": lengths.to(device)}

    def simcse_step():
        batch = objective.make_batch(raw)
        with autocast(device, dtype):
            loss, _ = objective(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def one_pass_step():   # the encoder once over the B sentences: what a single view costs
        with autocast(device, dtype):
            hidden = objective.backbone(raw["input_ids"], mask=padding_mask(raw["lengths"], T))
            loss = hidden.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = measure_peak_flops(device, dtype)
    simcse = statistics.median(timed(simcse_step, device, args.warmup, args.steps))
    single = statistics.median(timed(one_pass_step, device, args.warmup, args.steps))
    tokens_per_s = B * T / simcse
    mfu = objective.flops_per_token() * tokens_per_s / peak
    one_pass_flops = flops_per_token(matmul_weights(objective.backbone, lm_head=False), cfg.n_layer, cfg.n_head,
                                     cfg.head_dim, T)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu, {torch.get_num_threads()} threads")
    print(f"simcse {cfg.n_layer}x{cfg.n_embd} ({cfg.n_head} heads), batch {B} x seq_len {T}, {args.pooling} pooling, "
          f"{args.dtype}, {device_name}; measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    rows = (("simcse step", simcse, mfu, "(two passes per sentence)"),
            ("one encoder pass", single, one_pass_flops * B * T / single / peak,
             f"(simcse / one pass = {simcse / single:.2f}x)"))
    for name, seconds, utilization, note in rows:
        print(f"  {name:<17} {1e3 * seconds:8.2f} ms   {B / seconds:10,.0f} sentences/s   "
              f"{B * T / seconds:12,.0f} tok/s   MFU {100 * utilization:5.1f}% {note}")

if __name__ == "__main__":
    main()
