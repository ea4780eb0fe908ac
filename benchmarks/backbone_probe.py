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
  r(length)  that direction's correlation with the rows' token counts: a large share with a large
             |r| means the vectors mostly say how long a row is (a position-dependent component
             that mean pooling turns into length), not what it says

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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="pretraining checkpoints (compare_objectives.py's runs)")
    parser.add_argument("--task", required=True, help="compare_objectives.py's WORK/task folder (train.tsv, val.tsv)")
    parser.add_argument("--random", action="store_true", help="also each checkpoint's model with fresh weights")
    args = parser.parse_args(argv)
    print("| checkpoint | depth | cos(rows) | centroid acc (%) | pc1 share | r(pc1, length) |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        for fresh in ([False, True] if args.random else [False]):
            name = os.path.basename(os.path.dirname(os.path.abspath(path))) + (" (fresh weights)" if fresh else "")
            for depth, numbers in probe_checkpoint(path, args.task, fresh).items():
                print(f"| {name} | {depth} | {numbers['cos']:.3f} | {100 * numbers['centroid']:.1f} | "
                      f"{numbers['pc1']:.2f} | {numbers['r(length)']:+.2f} |", flush=True)


if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
