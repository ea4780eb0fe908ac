"""Sample from a checkpoint: `python sample.py [--ckpt out] [--prompt "Once"] [--num_samples 3]`.

--ckpt is a checkpoint file or a run folder (then its newest checkpoint).

The checkpoint alone is enough: it carries the config and the tokenizer. Generation starts from
an end-of-document token, so the model begins as it would begin a new document, then continues
the prompt. Each sample stops at the first end-of-document token it produces.

flags: --ckpt --prompt --max_new_tokens --temperature --top_k --top_p --num_samples --seed --device
       --no_cache (recompute the whole prefix at every step; same tokens, slower)

Masked-LM checkpoints (--objective mlm, wwm, span, or mlm+sop) fill in masks instead of generating:
    python sample.py --ckpt out --fill "The dog chased the red <mask>." [--top_k 5]
prints, for every <mask>, the top-k candidates with their probabilities (all masks are
predicted at once, each from the text around it), then the text with each mask's best guess.
"""
from __future__ import annotations

import json
import sys

import torch

from minilm.checkpoint import load_checkpoint_or_newest, tensor_to_bytes
from minilm.cli import run_cli
from minilm.config import Config, check_value, parse_flags
from minilm.errors import UserError
from minilm.generate import generate
from minilm.objectives import build_objective
from minilm.tokenizer import CLS_ID, EOS_ID, MASK_ID, SEP_ID, Tokenizer
from minilm.trainer import resolve_device

DEFAULTS = dict(ckpt="out", prompt="", max_new_tokens=100, temperature=0.8, top_k=0, top_p=0.95,
                num_samples=3, seed=0, device="auto", no_cache=False, fill="")
# what each number accepts (config.check_value): a one-line error naming the flag otherwise
FLAG_RULES = dict(max_new_tokens=dict(at_least=0), num_samples=dict(at_least=1),
                  temperature=dict(at_least=0),          # 0 = greedy
                  top_k=dict(at_least=0),                # 0 = off
                  top_p=dict(within="(0, 1]"), seed=dict(within="[0, 2**64)"))
MASK = "<mask>"
FILL_TOP_K = 5  # --top_k when filling and none is given


def load_for_inference(path: str, device):
    """(objective with weights, tokenizer, config) from a checkpoint file."""
    # a run folder means its newest checkpoint that loads: a damaged newer one is skipped, with a note
    path, state = load_checkpoint_or_newest(path, log=lambda msg: print(msg, file=sys.stderr))
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


@torch.no_grad()
def fill_mask(objective, tokenizer, text: str, top_k: int, device) -> tuple[list, list[int]]:
    """The top_k candidates for every <mask> in `text`, from one pass of the encoder.

    Returns ([[(token id, probability), ...] per mask, in text order], the input ids).
    A space right before <mask> goes into the mask: in training, a masked word's first piece
    ("▁cat") carries its space, so "the red <mask>" must read as "the red" + <mask>, not
    "the red" + "▁" + <mask>. Write "red<mask>" to ask for the rest of a word.
    Only the text "<mask>" becomes a mask (inserted by id); any other special name typed in the
    text ("<sep>", "<cls>", "<extra_id_0>") is encoded as plain text, like in the training data.
    """
    if MASK not in text:
        raise UserError(f'--fill needs at least one {MASK} in the text, e.g. --fill "The dog chased the red {MASK}."')
    parts = text.split(MASK)
    # Frame the text as training showed texts: an encoder trained on plain windows saw a new
    # document after <eos>; one trained on sentence pairs (mlm+sop) saw [CLS] A [SEP].
    pairs = objective.data == "segment_pairs"
    ids = [CLS_ID] if pairs else [EOS_ID]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        ids += tokenizer.encode(part if last or not part.endswith(" ") else part[:-1])
        if not last:
            ids.append(MASK_ID)
    if pairs:
        ids.append(SEP_ID)
    seq_len = objective.backbone.cfg.seq_len
    if len(ids) > seq_len:
        raise UserError(f"--fill text is {len(ids)} tokens, longer than the model's context window ({seq_len}); "
                        "shorten it")
    input_ids = torch.tensor([ids], device=device)
    logits = objective.predict(input_ids)[0]                        # (T, V)
    where = (input_ids[0] == MASK_ID).nonzero().squeeze(1)
    probs, best = logits[where].float().softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    candidates = [list(zip(b.tolist(), p.tolist())) for b, p in zip(best, probs)]
    return candidates, ids


def print_fill(objective, tokenizer, text: str, top_k: int, device) -> None:
    candidates, ids = fill_mask(objective, tokenizer, text, top_k, device)
    # a guess that is a special id shows its name ("<sep>"), not nothing; the text itself holds
    # no special id but the masks, which are replaced, so names in the output are guesses
    show = lambda tokens: json.dumps(tokenizer.decode(tokens, specials=True), ensure_ascii=False)  # noqa: E731
    for i, cands in enumerate(candidates):
        print(f"{MASK} {i + 1} of {len(candidates)}:")
        for token, p in cands:
            print(f"  {p:.4f}  {show([token])}")
    best = iter([c[0][0] for c in candidates])
    inner = ids[1:-1] if ids[-1] == SEP_ID else ids[1:]  # without fill_mask's framing
    filled = [next(best) if t == MASK_ID else t for t in inner]
    # quoted, like the candidates: one line even when a guess is "\n"
    print(f"filled: {show(filled)}")


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    args = parse_flags(argv, DEFAULTS)
    for name, rule in FLAG_RULES.items():
        check_value(name, args[name], **rule)
    device = resolve_device(args["device"])
    objective, tokenizer, cfg = load_for_inference(args["ckpt"], device)
    if args["fill"]:
        if not objective.fills_masks:
            hint = ("use --prompt to generate" if objective.model_kind == "decoder" else
                    "it has no masked-LM head to fill masks with")
            raise UserError(f"--fill needs a masked-LM checkpoint (--objective mlm, wwm, span or mlm+sop); "
                            f"{args['ckpt']} holds a {objective.model_kind} ({objective.name}): {hint}")
        print_fill(objective, tokenizer, args["fill"], args["top_k"] or FILL_TOP_K, device)
        return
    if objective.model_kind == "encoder":
        hint = (f'fill in masks instead: --fill "text with {MASK}"' if objective.fills_masks else
                "and it has no masked-LM head either; its backbone is for fine-tuning")
        raise UserError(f"{args['ckpt']} holds an encoder ({objective.name}), which cannot generate text; {hint}")
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
