"""Why an rtd (ELECTRA) run does or does not learn: the discriminator against its base rate, the
generator's accuracy, and which loss the shared token table follows, over steps, for a few recipes.

    # once: the built-in corpus's tokenizer and token files
    python train.py --objective rtd --max_steps 0 --out_dir /tmp/rtd_data
    # then one line per recipe and evaluation
    python benchmarks/rtd_diagnosis.py --data_dir /tmp/rtd_data/data --steps 400 --every 100 \
        --shape "--n_layer 4 --n_embd 256 --seq_len 128 --batch_size 16" \
        --recipe "" --recipe "--rtd_weight 1" --recipe "--lr 5e-4 --min_lr 5e-5"

Each recipe is train.py flags on top of --objective rtd and the shape; the steps run through
minilm's own Trainer.train_step (its AdamW groups, schedule and clipping). At every --every steps,
before that step's update, on that step's training batch:
  gen|tok, disc|tok  norm of the gradient the token table gets from the generator's loss and from
                     rtd_weight x the discriminator's loss (each its own backward); under
                     --embedding_sharing none or gdes, each loss's own table (gdes: the residual)
  cos                cosine between those two gradients (< 0: they pull the table apart)
  clip               the factor --grad_clip scales the whole step by (1: not clipped)
  disc share         share of the squared gradient norm that the discriminator's loss gives
and from Trainer.evaluate (the validation batches): the generator's accuracy, the discriminator's
loss against the base rate's entropy H(positive_share), its precision and recall of "replaced",
cos(rows): the mean pairwise cosine of the discriminator's mean-pooled rows (1: collapsed), and
common: the share of the token table's squared norm in the direction all its rows share.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from minilm.config import explicit_flags, parse_overrides  # noqa: E402
from minilm.data import make_source  # noqa: E402
from minilm.objectives import build_objective, model_config_for, model_defaults_for, train_defaults_for  # noqa: E402
from minilm.tokenizer import Tokenizer  # noqa: E402
from minilm.trainer import Trainer  # noqa: E402


def loss_gradients(objective, batch, params):
    """The gradients of the generator's loss and of rtd_weight x the discriminator's loss on
    `params`, each by its own backward (the same samples: the noise is in the batch)."""
    weight = objective.options.rtd_weight
    total, _ = objective(batch)
    objective.options.rtd_weight = 0.0
    generator_loss, _ = objective(batch)
    objective.options.rtd_weight = weight
    def grads(loss):
        return [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]
    g_gen, g_total = grads(generator_loss), grads(total)
    return g_gen, [t - g for t, g in zip(g_total, g_gen)]


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@torch.no_grad()
def row_cosine(objective, source):
    """Mean pairwise cosine of the discriminator's mean-pooled hidden states over one val batch."""
    raw = source.batch(0, 0)
    ids = raw[:, :objective.seq_len]
    pooled = torch.nn.functional.normalize(objective.backbone(ids).mean(1), dim=-1)   # (B, C)
    sims = pooled @ pooled.T
    B = len(pooled)
    return float((sims.sum() - B) / (B * (B - 1)))


@torch.no_grad()
def common_share(table):
    """||mean row||^2 / mean ||row||^2 of the token table: 1 when every row is the same vector."""
    return float(table.mean(0).pow(2).sum() / table.pow(2).sum(1).mean())


def run(recipe: str, args) -> None:
    argv = ["--objective", "rtd", *shlex.split(args.shape), *shlex.split(recipe), "--max_steps", str(args.steps),
            "--threads", str(args.threads), "--out_dir", "/tmp/rtd_diagnosis_unused"]
    cfg = parse_overrides(argv)
    cfg.model = model_config_for("rtd", model_defaults_for("rtd", cfg.model, explicit_flags(argv)))
    cfg.train = train_defaults_for("rtd", cfg.train, explicit_flags(argv))   # as train.py does
    torch.set_num_threads(cfg.train.threads)
    tokenizer = Tokenizer.load(os.path.join(args.data_dir, "tokenizer.model"))
    torch.manual_seed(cfg.train.seed)
    objective = build_objective("rtd", cfg.model, tokenizer, cfg.obj)
    train = make_source("blocks", args.data_dir, "train", cfg.model.seq_len, cfg.train.batch_size,
                        seed=cfg.train.seed, log=lambda *_: None)
    val = make_source("blocks", args.data_dir, "val", cfg.model.seq_len, cfg.train.batch_size, seed=0,
                      log=lambda *_: None)
    trainer = Trainer(cfg, objective, train, val, tokenizer, log=lambda *_: None)
    # the token table each loss trains: one Parameter under --embedding_sharing electra; the
    # generator's and the discriminator's own (its residual under gdes) otherwise
    table = objective.generator.tok_emb.weight
    own = objective.backbone.tok_emb
    disc_table = own.delta if cfg.obj.embedding_sharing == "gdes" else own.weight
    params = [p for p in objective.parameters() if p.requires_grad]
    index = next(i for i, p in enumerate(params) if p is table)
    disc_index = next(i for i, p in enumerate(params) if p is disc_table)
    print(f"recipe: {recipe or '(defaults)'}  [lr {cfg.train.lr} warmup {cfg.train.warmup_steps} "
          f"rtd_weight {cfg.obj.rtd_weight} clip {cfg.train.grad_clip} "
          f"sharing {cfg.obj.embedding_sharing}]")
    print(f"{'step':>5} {'gen|tok':>8} {'disc|tok':>8} {'cos':>6} {'clip':>6} {'disc share':>10} | "
          f"{'gen acc':>7} {'d loss':>6} {'H(base)':>7} {'prec':>5} {'recall':>6} {'pos':>5} {'cos(rows)':>9} {'common':>6}")
    start = time.time()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            batch = objective.make_batch(train.batch(step, 0), trainer._generator(step, 0))
            g_gen, g_disc = loss_gradients(objective, batch, params)
            total = flat([a + b for a, b in zip(g_gen, g_disc)])
            clip = min(1.0, cfg.train.grad_clip / (float(total.norm()) + 1e-6)) if cfg.train.grad_clip else 1.0
            cos = float(torch.nn.functional.cosine_similarity(g_gen[index].flatten(), g_disc[disc_index].flatten(),
                                                              dim=0))
            disc_sq = sum(float(g.pow(2).sum()) for g, p in zip(g_disc, params))
            m = trainer.evaluate()
            p = m["discriminator/positive_share"]
            entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
            print(f"{step:>5} {float(g_gen[index].norm()):>8.3f} {float(g_disc[disc_index].norm()):>8.3f} {cos:>6.2f} "
                  f"{clip:>6.3f} {disc_sq / float(total.pow(2).sum()):>10.3f} | {m['generator/acc']:>7.3f} "
                  f"{m['discriminator/loss']:>6.3f} {entropy:>7.3f} {m['discriminator/precision']:>5.2f} "
                  f"{m['discriminator/recall']:>6.3f} {p:>5.3f} {row_cosine(objective, val):>9.3f} {common_share(table):>6.3f}",
                  flush=True)
            objective.zero_grad(set_to_none=True)
        if step < args.steps:
            trainer.train_step(step)
    print(f"({time.time() - start:.0f} s)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="a prepared folder (train.py --max_steps 0 writes one)")
    parser.add_argument("--shape", default="--n_layer 4 --n_embd 256 --seq_len 128 --batch_size 16")
    parser.add_argument("--recipe", action="append", help="train.py flags for one recipe (repeatable)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for recipe in args.recipe or [""]:
        run(recipe, args)


if __name__ == "__main__":
    main()
