#!/usr/bin/env python3
"""minilm / peer throughput ratios from peers.py JSON files, one column per invocation.

    python benchmarks/ratios.py peers-results/compare_*.json

A ratio is taken only between two rows of the SAME invocation (the harness README: the same bench
moves 6-36% between invocations). A ratio is starred when either row saw more than 5% of the CPUs
used by other processes ("other load"); discard those.
"""
from __future__ import annotations

import json
import statistics
import sys

PAIRS = [  # (minilm row, peer row)
    ("gpt-minilm", "gpt-nanogpt"),         # nanoGPT rows: peers.py --nanogpt-dir
    ("gpt-minilm-rope", "gpt-nanogpt"),
    ("bf16-minilm", "bf16-nanogpt"),
    ("bf16-minilm-rope", "bf16-nanogpt"),
    ("gpt-minilm-compile", "gpt-nanogpt"),
    ("gpt-minilm-rope-compile", "gpt-nanogpt"),
    ("gpt-minilm", "gpt-hf-sdpa"),
    ("gpt-minilm", "gpt-hf-eager"),
    ("gpt-minilm-rope", "gpt-hf-sdpa"),
    ("bf16-minilm", "bf16-hf-sdpa"),
    ("bf16-minilm-rope", "bf16-hf-sdpa"),
    ("gen-minilm", "gen-hf-cache"),
    ("gen-minilm-rope", "gen-hf-cache"),
    ("gen-minilm-nocache", "gen-hf-nocache"),
    ("mlm-minilm", "roberta-mlm"),
    ("bf16-mlm-minilm", "bf16-roberta-mlm"),
    ("mask-minilm", "collator-mlm"),       # masking alone, tokens/s of batches made
    ("plm-minilm", "xlnet-plm"),
    ("bf16-plm-minilm", "bf16-xlnet-plm"),
    ("rtd-minilm", "electra"),
    ("bf16-rtd-minilm", "bf16-electra"),
    ("t5-minilm", "t5-hf-same"),           # the same corruption, no padding on either side
    ("bf16-t5-minilm", "bf16-t5-hf-same"),
    ("beam-minilm", "beam-hf"),
]
LOAD_LIMIT = 0.05


def main(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append({r["bench"]: r for r in json.load(f)["results"]})
    head = ["minilm / peer (tokens/s)"] + [f"run {i + 1}" for i in range(len(runs))] + ["median (clean runs)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for a, b in PAIRS:
        cells, clean = [], []
        for run in runs:
            if a not in run or b not in run:
                cells.append("-")
                continue
            ratio = run[a]["tokens_per_s"]["median"] / run[b]["tokens_per_s"]["median"]
            load = max(run[a].get("foreign_cpu_frac", 0.0), run[b].get("foreign_cpu_frac", 0.0))
            noisy = load > LOAD_LIMIT
            cells.append(f"{ratio:.2f}x" + (f"* ({100 * load:.0f}% load)" if noisy else ""))
            if not noisy:
                clean.append(ratio)
        if all(c == "-" for c in cells):
            continue
        med = f"{statistics.median(clean):.2f}x (n={len(clean)})" if clean else "-"
        print("| " + " | ".join([f"{a} / {b}"] + cells + [med]) + " |")
    print()
    print("MFU (formula, vs measured fp32 matmul peak; bf16 rows also vs bf16 peak), per run:")
    for name in sorted({n for run in runs for n in run if run[n].get("kind") == "train"}):
        vals = []
        for run in runs:
            r = run.get(name)
            if r is None or r.get("mfu_formula") is None:
                vals.append("-")
                continue
            s = f"{100 * r['mfu_formula']:.1f}%"
            if r.get("mfu_formula_vs_bf16_peak") is not None:
                s += f" ({100 * r['mfu_formula_vs_bf16_peak']:.1f}% of bf16)"
            vals.append(s)
        print(f"  {name:18s} " + "  ".join(vals))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
