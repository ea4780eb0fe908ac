"""Sample from a checkpoint: `python sample.py [--ckpt out] [--prompt "Once"] [--num_samples 3]`.

--ckpt is a checkpoint file or a run folder (then its newest checkpoint).

The checkpoint alone is enough: it carries the config and the tokenizer. Generation starts from
an end-of-document token, so the model begins as it would begin a new document, then continues
the prompt. Each sample stops at the first end-of-document token it produces.

flags: --ckpt --prompt --max_new_tokens --temperature --top_k --top_p --num_samples --seed --device
       --no_cache (recompute the whole prefix at every step; same tokens, slower)
"""
from __future__ import annotations

import sys

import torch

from minilm.checkpoint import load_checkpoint, resolve_checkpoint, tensor_to_bytes
from minilm.cli import run_cli
from minilm.config import Config, parse_flags
from minilm.errors import UserError
from minilm.generate import generate
from minilm.objectives import build_objective
from minilm.tokenizer import EOS_ID, Tokenizer
from minilm.trainer import resolve_device

DEFAULTS = dict(ckpt="out", prompt="", max_new_tokens=100, temperature=0.8, top_k=0, top_p=0.95,
                num_samples=3, seed=0, device="auto", no_cache=False)


def load_for_inference(path: str, device):
    """(objective with weights, tokenizer, config) from a checkpoint file."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    cfg = Config.from_dict(state["config"])
    if state.get("tokenizer") is None:
        raise UserError(f"{path} carries no tokenizer; it was not written by train.py")
    tokenizer = Tokenizer(tensor_to_bytes(state["tokenizer"]))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"{path} is inconsistent: its tokenizer has {tokenizer.vocab_size} ids but its model "
                        f"has vocab_size {cfg.model.vocab_size}; retrain or use the matching checkpoint")
    objective = build_objective(state.get("objective", cfg.train.objective), cfg.model, tokenizer, cfg.obj)
    try:
        objective.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"{path}: the weights do not fit the model its config describes "
                        f"({str(err).splitlines()[0]})") from None
    return objective.to(device).eval(), tokenizer, cfg


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    args = parse_flags(argv, DEFAULTS)
    if args["num_samples"] < 1 or args["max_new_tokens"] < 0:
        raise UserError("--num_samples must be >= 1 and --max_new_tokens >= 0")
    if not 0.0 < args["top_p"] <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {args['top_p']}")
    device = resolve_device(args["device"])
    objective, tokenizer, cfg = load_for_inference(args["ckpt"], device)
    if objective.model_kind != "decoder":
        raise UserError(f"{args['ckpt']} holds a {objective.model_kind} ({objective.name}); "
                        "text generation needs a decoder checkpoint (--objective clm)")
    prompt_ids = [EOS_ID] + tokenizer.encode(args["prompt"])
    prompt = torch.tensor([prompt_ids] * args["num_samples"], device=device)
    generator = torch.Generator(device=device).manual_seed(args["seed"])
    out = generate(objective.backbone, prompt, args["max_new_tokens"], temperature=args["temperature"],
                   top_k=args["top_k"], top_p=args["top_p"], generator=generator,
                   use_cache=not args["no_cache"], warn=lambda msg: print(f"note: {msg}", file=sys.stderr))
    for i, row in enumerate(out.tolist()):
        new = row[len(prompt_ids):]
        if EOS_ID in new:
            new = new[:new.index(EOS_ID)]
        print(f"--- sample {i + 1}")
        print(tokenizer.decode(prompt_ids[1:] + new))


if __name__ == "__main__":
    run_cli(main)
