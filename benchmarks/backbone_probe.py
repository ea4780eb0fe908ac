"""What a pretrained backbone's features hold, block by block, before any fine-tuning.

    python benchmarks/backbone_probe.py --task cmp-default/task cmp-default/runs/pretrain-*-seed1/ckpt-*.pt
    python benchmarks/backbone_probe.py --task cmp-default/task --random CKPT    # the same model, fresh weights

For each checkpoint (rtd: its discriminator; t5: its encoder) and each depth (the token table
alone, the output of every block, the final hidden states after the last norm), every labelled
row of compare_objectives.py's task (TASK/train.tsv, TASK/val.tsv) becomes one vector: the mean
over the row's positions (<eos> first, as minilm's embed frames a text; t5's encoder: last), the
row cut to the window as classify cuts it. Four numbers per depth, on unit vectors:

  cos        the validation rows' mean pairwise cosine: near 1, every row is nearly one vector
  centroid   nearest-centroid accuracy: class centroids of the training rows, vectors centred on
             the training rows' mean first (a direction every row shares carries no class)
  pc1        the share of the centred validation vectors' variance along their first principal
             direction
  r(length)  that direction's correlation with the rows' token counts. A large |r| need not mean
             the vectors say how long a row is: on the man-page task a row is 400 characters, and
             code (`_`, `);`, `{`) cuts into more tokens than prose, so a prose-or-code direction
             correlates with the count too; --explain tells the two apart

With --explain, what the final depth's first principal direction reads, two ways:

  tokens     the token ids whose final hidden states lie furthest along it at either end (mean
             projection over their occurrences in the validation rows, ids seen 5 times or more)
  cut shift  how far the validation rows move along it when each is cut to its first CUT tokens,
             in units of its spread over the full rows: a direction that says "how long is this
             row" moves them by about its spread or more; one that reads what the text is (prose
             or code) barely moves them

No training and no seed: the numbers are a property of the weights (benchmarks/README.md, issue 23).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare_objectives import load_backbone, read_tsv_rows  # noqa: E402
from minilm.api import batches, padded                       # noqa: E402
from minilm.model import padding_mask                        # noqa: E402
from minilm.tokenizer import EOS_ID                          # noqa: E402


def stack_of(objective):
    """The single stack the task's rows go through: an encoder-decoder's encoder, else the backbone."""
    backbone = objective.backbone
    return backbone.encoder if objective.model_kind == "seq2seq" else backbone


def framed_rows(objective, tokenizer, texts: list[str]) -> list[list[int]]:
    keep = stack_of(objective).cfg.seq_len - 1
    ids = [tokenizer.encode(text)[:keep] for text in texts]
    return [row + [EOS_ID] if objective.model_kind == "seq2seq" else [EOS_ID] + row for row in ids]


@torch.no_grad()
def depth_vectors(objective, rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """{"table", "block 0", ..., "final"}: (N, C) mean-pooled vectors of each row at each depth."""
    stack = stack_of(objective)
    outputs: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: outputs.__setitem__(i, out))
             for i, block in enumerate(stack.blocks)]
    pooled: dict[str, list[torch.Tensor]] = {}
    try:
        for batch in batches(rows, 32):
            ids, lengths = padded(batch, "cpu")
            mask = padding_mask(lengths, ids.shape[1])
            final = stack(ids, mask=mask)
            real = mask[:, 0, 0, :, None].float()                                    # (N, T, 1)
            depths = {"table": stack.tok_emb(ids), **{f"block {i}": out for i, out in sorted(outputs.items())},
                      "final": final}
            for name, hidden in depths.items():
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                pooled.setdefault(name, []).append((hidden.float() * real).sum(1) / lengths[:, None].float())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(parts) for name, parts in pooled.items()}


def probe(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
          val_lengths: torch.Tensor) -> dict[str, float]:
    """The four numbers of the module docstring for one depth."""
    train, val = F.normalize(train, dim=-1), F.normalize(val, dim=-1)
    n = len(val)
    cosine = ((val @ val.t()).sum() - n) / (n * (n - 1))
    mean = train.mean(0)
    centred_train, centred_val = F.normalize(train - mean, dim=-1), F.normalize(val - mean, dim=-1)
    classes = int(train_labels.max()) + 1
    centroids = torch.stack([centred_train[train_labels == k].mean(0) for k in range(classes)])
    accuracy = ((centred_val @ centroids.t()).argmax(-1) == val_labels).float().mean()
    spread = val - val.mean(0)
    u, singular, _ = torch.linalg.svd(spread, full_matrices=False)
    share = singular[0] ** 2 / (singular ** 2).sum()
    r = torch.corrcoef(torch.stack([u[:, 0], val_lengths.float()]))[0, 1]
    return {"cos": float(cosine), "centroid": float(accuracy), "pc1": float(share), "r(length)": float(r)}


def probe_checkpoint(path: str, task: str, random_weights: bool = False) -> dict[str, dict[str, float]]:
    """{depth: probe(...)} for one checkpoint on the task in folder `task`."""
    objective, tokenizer = load_backbone(path, random_weights)
    train_rows, val_rows = read_tsv_rows(os.path.join(task, "train.tsv")), read_tsv_rows(os.path.join(task, "val.tsv"))
    labels = sorted({label for _, label in train_rows})
    train_ids = framed_rows(objective, tokenizer, [text for text, _ in train_rows])
    val_ids = framed_rows(objective, tokenizer, [text for text, _ in val_rows])
    train_vectors, val_vectors = depth_vectors(objective, train_ids), depth_vectors(objective, val_ids)
    train_labels = torch.tensor([labels.index(label) for _, label in train_rows])
    val_labels = torch.tensor([labels.index(label) for _, label in val_rows])
    val_lengths = torch.tensor([len(row) for row in val_ids])
    return {depth: probe(train_vectors[depth], train_labels, val_vectors[depth], val_labels, val_lengths)
            for depth in train_vectors}


@torch.no_grad()
def final_states(objective, rows: list[list[int]]) -> list[torch.Tensor]:
    """Each row's final hidden states (its length, C), padding dropped."""
    stack, states = stack_of(objective), []
    for batch in batches(rows, 32):
        ids, lengths = padded(batch, "cpu")
        hidden = stack(ids, mask=padding_mask(lengths, ids.shape[1])).float()          # (N, T, C)
        states += [hidden[b, :length] for b, length in enumerate(lengths.tolist())]
    return states


def first_direction(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, first principal direction (C,)) of unit-normalized pooled vectors (N, C)."""
    unit = F.normalize(pooled, dim=-1)
    mean = unit.mean(0)
    return mean, torch.linalg.svd(unit - mean, full_matrices=False)[2][0]


def explain_direction(objective, tokenizer, val_ids: list[list[int]], cut: int = 60, shown: int = 8) -> dict:
    """--explain: {"low": [(piece, mean projection)], "high": [...], "cut shift": float} for the
    final depth's first principal direction (module docstring)."""
    states = final_states(objective, val_ids)
    mean, direction = first_direction(torch.stack([s.mean(0) for s in states]))
    projections = ((F.normalize(torch.stack([s.mean(0) for s in states]), dim=-1) - mean) @ direction)
    tokens = torch.cat(states)
    along = (tokens - tokens.mean(0)) @ direction                                   # (all tokens,)
    ids = torch.tensor([i for row in val_ids for i in row])
    counts = torch.bincount(ids)
    sums = torch.bincount(ids, weights=along.double(), minlength=len(counts))
    seen = (counts >= 5).nonzero().flatten()
    order = seen[(sums[seen] / counts[seen]).argsort()]
    piece = tokenizer.sp.id_to_piece
    named = [(piece(int(i)), round(float(sums[i] / counts[i]), 2)) for i in order]
    cut_rows = [row[:cut] for row in val_ids]
    cut_pooled = F.normalize(torch.stack([s.mean(0) for s in final_states(objective, cut_rows)]), dim=-1)
    shift = float(((cut_pooled - mean) @ direction).mean() - projections.mean()) / float(projections.std())
    return {"low": named[:shown], "high": named[::-1][:shown], "cut shift": shift}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="pretraining checkpoints (compare_objectives.py's runs)")
    parser.add_argument("--task", required=True, help="compare_objectives.py's WORK/task folder (train.tsv, val.tsv)")
    parser.add_argument("--random", action="store_true", help="also each checkpoint's model with fresh weights")
    parser.add_argument("--explain", action="store_true", help="also what the final depth's first principal "
                                                               "direction reads: its tokens, and the rows cut short")
    args = parser.parse_args(argv)
    print("| checkpoint | depth | cos(rows) | centroid acc (%) | pc1 share | r(pc1, length) |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        for fresh in ([False, True] if args.random else [False]):
            name = os.path.basename(os.path.dirname(os.path.abspath(path))) + (" (fresh weights)" if fresh else "")
            for depth, numbers in probe_checkpoint(path, args.task, fresh).items():
                print(f"| {name} | {depth} | {numbers['cos']:.3f} | {100 * numbers['centroid']:.1f} | "
                      f"{numbers['pc1']:.2f} | {numbers['r(length)']:+.2f} |", flush=True)
    for path in args.checkpoints if args.explain else []:
        objective, tokenizer = load_backbone(path)
        val_rows = read_tsv_rows(os.path.join(args.task, "val.tsv"))
        found = explain_direction(objective, tokenizer, framed_rows(objective, tokenizer, [t for t, _ in val_rows]))
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        print(f"\n{name}, the final depth's first direction: rows cut to 60 tokens move "
              f"{found['cut shift']:+.2f} of its spread along it\n  one end:   "
              + ", ".join(f"{p!r} {v:+.2f}" for p, v in found["low"]) + "\n  other end: "
              + ", ".join(f"{p!r} {v:+.2f}" for p, v in found["high"]), flush=True)


if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
