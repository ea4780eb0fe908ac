"""Where a CLM training step's time goes on the CPU: one table per row, shares of the step.

Runs the peer harness's own step (../shared/bench/peers.py: its batch stream, its AdamW) for the
rows of benchmarks/peers_plugin.py (gpt-minilm, gpt-minilm-rope, their bf16 versions) and, with
--nanogpt-dir, nanoGPT's model, under torch.profiler, and sorts the time into parts:

  forward, by the module (or function) an op ran in: the linear layers, attention (the attention
  function or SDPA), norms, rotary, the MLP's activation, embeddings, the LM head (its matmul)
  and the loss (cross-entropy), and the rest (residual adds, reshapes);
  backward, by the autograd node that ran (MmBackward0 is a linear layer's, and so on);
  the optimizer step (the harness's AdamW) and zero_grad.

A profile, not a timing: the profiler adds its own overhead per op, so read shares, and time
steps with peers.py. One thread by default, so a busy machine distorts the shares least.

    python benchmarks/profile_step.py --rows gpt-minilm,gpt-minilm-rope --nanogpt-dir /tmp/nanogpt
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import minilm.model as minilm_model  # noqa: E402

PARTS = ["linear", "attention", "norm", "rotary", "activation", "lm head", "loss", "embedding", "other"]

# backward nodes that ran outside any labelled forward op (should be none) -> part, by name
BACKWARD = [
    (("MmBackward", "AddmmBackward"), "linear"),
    (("ScaledDotProduct",), "attention"),
    (("_SummedCrossEntropy", "NllLossBackward", "LogSoftmaxBackward"), "loss"),
]

def load_harness(path):
    spec = importlib.util.spec_from_file_location("peers", path)
    h = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h)
    return h


class Scopes:
    """Labels every forward op with the part it belongs to, by module (forward hooks) and by
    function (the attention function and the loss are wrapped while profiling)."""

    def __init__(self):
        self.stack = []

    def push(self, label):
        rf = torch.autograd.profiler.record_function(f"part:{label}")
        rf.__enter__()
        self.stack.append(rf)

    def pop(self):
        self.stack.pop().__exit__(None, None, None)

    def hook(self, module, label):
        module.register_forward_pre_hook(lambda m, a: self.push(label))
        module.register_forward_hook(lambda m, a, o: self.pop())

    @contextlib.contextmanager
    def wrap(self, owner, name, label):
        original = getattr(owner, name)

        def wrapped(*a, **k):
            with torch.autograd.profiler.record_function(f"part:{label}"):
                return original(*a, **k)
        setattr(owner, name, wrapped)
        try:
            yield
        finally:
            setattr(owner, name, original)


def label_modules(scopes, model):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            scopes.hook(m, "linear")
        elif isinstance(m, (nn.LayerNorm, minilm_model.RMSNorm)) or type(m).__name__ == "LayerNorm":
            scopes.hook(m, "norm")
        elif isinstance(m, minilm_model.Rotary):
            scopes.hook(m, "rotary")
        elif isinstance(m, nn.Embedding):
            scopes.hook(m, "embedding")
        elif type(m).__name__ in ("MLP", "GELU", "NewGELUActivation"):
            scopes.hook(m, "activation")      # the MLP's linears are labelled inside it


def categorize(events):
    """{part: ms} for forward ops (by the innermost part: scope they ran in), backward (each autograd
    node goes to the part of the forward op that made it: the profiler gives both the op's
    sequence number) and the optimizer step."""
    fwd, bwd, other = collections.Counter(), collections.Counter(), collections.Counter()
    made_in = {}   # forward op's sequence number -> its part

    def walk(ev, label):
        name = ev.name
        if name.startswith("autograd::engine::evaluate_function: "):
            node = name.split(": ", 1)[1]
            part = made_in.get(ev.sequence_nr) if ev.sequence_nr >= 0 else None
            if part is None:
                part = next((p for prefixes, p in BACKWARD if node.startswith(prefixes)), "other")
            bwd[part] += ev.cpu_time_total / 1e3
            return
        if name.startswith(("part:", "phase:")):
            label = name.split(":", 1)[1]
        elif ev.sequence_nr >= 0 and label not in ("backward", "optimizer"):   # an op, or a custom Function
            # an op that makes no autograd node shows the number the next node will get: the last op
            # to show a number is the one that made its node
            made_in[ev.sequence_nr] = label if label in PARTS else "other"
        if name.startswith("aten::") and ev.cpu_parent is not None and not ev.cpu_parent.name.startswith("aten::"):
            # an op called from Python: count its whole time once, in its part
            if label in ("optimizer", "zero_grad"):
                other[label] += ev.cpu_time_total / 1e3
            elif label not in (None, "backward"):
                fwd[label if label in PARTS else "other"] += ev.cpu_time_total / 1e3
        for child in ev.cpu_children:
            walk(child, label)

    for ev in sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start):
        walk(ev, None)
    return fwd, bwd, other


def rows(h, args):
    sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
    plugin = importlib.import_module("peers_plugin")
    made = {}
    for row in args.rows.split(","):
        bf16 = row.startswith("bf16-")
        base = row.removeprefix("bf16-")
        if base in ("nanogpt", "gpt-nanogpt"):
            model = h.nanogpt_model(args)
            stream = h.lm_batch_fn()
            made[row] = (model, lambda m, b: m(b[0], b[1])[1], stream, bf16)
        else:
            arch = plugin.MINILM_ARCH if base in ("minilm-rope", "gpt-minilm-rope") else plugin.GPT2_ARCH
            obj, *_ = plugin.build(h, arch)
            stream = h.lm_batch_fn()

            def batch_fn(obj=obj, stream=stream):
                x, y = stream()
                return obj.make_batch(torch.cat([x, y[:, -1:]], dim=1))
            made[row] = (obj, lambda m, b: m(b)[0], batch_fn, bf16)
    return made


def profile_row(h, args, model, loss_fn, batch_fn, bf16):
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model.train()
    opt = h.make_adamw(list(model.named_parameters()))
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    scopes = Scopes()
    label_modules(scopes, model)
    is_minilm = hasattr(model, "backbone")

    def step():
        batch = batch_fn()
        with torch.autograd.profiler.record_function("phase:forward"), ac():
            loss = loss_fn(model, batch)
        with torch.autograd.profiler.record_function("phase:backward"):
            loss.backward()
        with torch.autograd.profiler.record_function("phase:optimizer"):
            opt.step()
        with torch.autograd.profiler.record_function("phase:zero_grad"):
            opt.zero_grad(set_to_none=True)

    wraps = contextlib.ExitStack()
    with wraps:
        if is_minilm:
            wraps.enter_context(scopes.wrap(minilm_model, "attention", "attention"))
            import minilm.objectives.base as base
            wraps.enter_context(scopes.wrap(base, "cross_entropy_sum", "loss"))
            # the head's matmul and the loss as one while training (losses.linear_cross_entropy):
            # charged to "lm head"; compare the two rows' sum
            if hasattr(base, "linear_cross_entropy"):   # not in minilm before it (to profile an old commit)
                wraps.enter_context(scopes.wrap(base, "linear_cross_entropy", "lm head"))
            wraps.enter_context(scopes.wrap(minilm_model.Transformer, "logits", "lm head"))
        else:
            wraps.enter_context(scopes.wrap(F, "scaled_dot_product_attention", "attention"))
            wraps.enter_context(scopes.wrap(F, "cross_entropy", "loss"))
            scopes.hook(model.lm_head, "lm head")
        for _ in range(args.warmup):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
    fwd, bwd, other = categorize(prof.events())
    n = args.steps
    n = args.steps
    if args.nodes:
        nodes = collections.Counter()
        for ev in prof.events():
            if ev.name.startswith("autograd::engine::evaluate_function: "):
                nodes[ev.name.split(": ", 1)[1]] += ev.cpu_time_total / 1e3 / n
        print(nodes.most_common(25), file=sys.stderr)
    return ({k: v / n for k, v in fwd.items()}, {k: v / n for k, v in bwd.items()},
            {k: v / n for k, v in other.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="gpt-minilm,gpt-minilm-rope")
    ap.add_argument("--harness", default=os.path.join(_ROOT, "..", "shared", "bench", "peers.py"))
    ap.add_argument("--nanogpt-dir", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nodes", action="store_true", help="also print the costliest autograd nodes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h = load_harness(args.harness)
    results = {}
    for row, (model, loss_fn, batch_fn, bf16) in rows(h, args).items():
        print(f"profiling {row} ...", file=sys.stderr, flush=True)
        results[row] = profile_row(h, args, model, loss_fn, batch_fn, bf16)
    names = list(results)
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    totals = {r: sum(f.values()) + sum(b.values()) + sum(o.values()) for r, (f, b, o) in results.items()}
    for kind, index in (("fwd", 0), ("bwd", 1)):
        for part in PARTS:
            cells = [results[r][index].get(part, 0.0) for r in names]
            if any(cells):
                print(f"| {kind} {part} | " + " | ".join(f"{c:.0f} ms ({100 * c / totals[r]:.0f}%)"
                                                       for c, r in zip(cells, names)) + " |")
    cells = [sum(results[r][i].get(p, 0.0) for i in (0, 1) for p in ("lm head", "loss")) for r in names]
    print("| lm head + loss, fwd + bwd | " + " | ".join(f"{c:.0f} ms ({100 * c / totals[r]:.0f}%)"
                                                       for c, r in zip(cells, names)) + " |")
    for part in ("optimizer", "zero_grad"):
        cells = [results[r][2].get(part, 0.0) for r in names]
        print(f"| {part} | " + " | ".join(f"{c:.0f} ms ({100 * c / totals[r]:.0f}%)" for c, r in zip(cells, names)) + " |")
    print("| step (profiled) | " + " | ".join(f"{totals[r]:.0f} ms" for r in names) + " |")


if __name__ == "__main__":
    main()
