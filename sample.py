"""Sample from a checkpoint: `python sample.py [--ckpt out] [--prompt "Once"] [--num_samples 3]`.

--ckpt is a checkpoint file or a run folder (then its newest checkpoint).

The checkpoint alone is enough: it carries the config and the tokenizer. What it can do depends on
the objective it was trained with:

Decoders (--objective clm) and prefix LMs (--objective prefix_lm) continue a --prompt. Generation
starts from an end-of-document token, so the model begins as it would begin a new document, then
continues the prompt (a prefix LM reads the prompt in both directions, as in training). Each
sample stops at the first end-of-document token it produces.

flags: --ckpt --prompt --max_new_tokens --temperature --top_k --top_p --num_samples --seed --device
       --no_cache (recompute the whole prefix at every step; same tokens, slower)

Masked-LM checkpoints (--objective mlm, wwm, span, or mlm+sop) fill in masks instead of generating:
    python sample.py --ckpt out --fill "The dog chased the red <mask>." [--top_k 5]
prints, for every <mask>, the top-k candidates with their probabilities (all masks are
predicted at once, each from the text around it), then the text with each mask's best guess.

Encoder-decoders (--objective t5) fill in sentinels, each hiding a span of any length:
    python sample.py --ckpt out --infill "The cat <extra_id_0> on the <extra_id_1>."
prints the text with every span filled in. Number the sentinels <extra_id_0>, <extra_id_1>, ...
in order, as in training; any other text is plain text. --num_samples N prints N sampled
fillings (--temperature, --top_k, --top_p as above); --temperature 0 prints the one greedy
filling; --beam_size K (> 1) prints the best min(N, K) fillings of a beam search (no sampling:
--temperature, --top_k and --top_p are unused), ranked by
sum of log-probabilities / length ** --length_penalty (default 1.0: larger favours longer spans).

Replaced-token detectors (--objective rtd, ELECTRA's discriminator) score text instead:
    python sample.py --ckpt out --score "The chef cooked the meal."
prints one line per token: the discriminator's probability that the token was replaced (by the
generator in training), then the piece. Write a wrong word in to see it stand out.
"""
from __future__ import annotations

import json
import re
import sys

import torch

from minilm.checkpoint import load_checkpoint_or_newest, tensor_to_bytes
from minilm.cli import run_cli
from minilm.config import Config, check_value, parse_flags
from minilm.errors import UserError
from minilm.generate import beam_search, generate, generate_seq2seq
from minilm.objectives import build_objective
from minilm.tokenizer import CLS_ID, EOS_ID, MASK_ID, NUM_SENTINELS, SENTINEL_IDS, SEP_ID, Tokenizer
from minilm.trainer import resolve_device

DEFAULTS = dict(ckpt="out", prompt="", max_new_tokens=100, temperature=0.8, top_k=0, top_p=0.95,
                num_samples=3, seed=0, device="auto", no_cache=False, fill="", infill="", beam_size=1,
                length_penalty=1.0, score="")
# what each number accepts (config.check_value): a one-line error naming the flag otherwise
FLAG_RULES = dict(max_new_tokens=dict(at_least=0), num_samples=dict(at_least=1),
                  temperature=dict(at_least=0),          # 0 = greedy
                  top_k=dict(at_least=0),                # 0 = off
                  top_p=dict(within="(0, 1]"), seed=dict(within="[0, 2**64)"),
                  beam_size=dict(at_least=1), length_penalty=dict())  # any finite number
MASK = "<mask>"
FILL_TOP_K = 5  # --top_k when filling and none is given
SENTINEL = re.compile(r"<extra_id_(\d+)>")
INFILL_EXAMPLE = '--infill "The cat <extra_id_0> on the <extra_id_1>."'


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


# ----------------------------------------------------------------------------- score (rtd)
@torch.no_grad()
def score_tokens(objective, tokenizer, text: str, device) -> list[tuple[int, float]]:
    """[(token id, probability the discriminator gives to "replaced")] for every token of `text`,
    from one pass. The text is framed as training framed a new document: after <eos>, whose own
    score is not returned."""
    if not text.strip():
        raise UserError('--score needs some text, e.g. --score "The chef cooked the meal."')
    ids = [EOS_ID] + tokenizer.encode(text)
    seq_len = objective.backbone.cfg.seq_len
    if len(ids) > seq_len:
        raise UserError(f"--score text is {len(ids)} tokens, longer than the model's context window ({seq_len}); "
                        "shorten it")
    probabilities = objective.replaced_probabilities(torch.tensor([ids], device=device))[0]   # (T,)
    return list(zip(ids[1:], probabilities[1:].tolist()))


def print_scores(objective, tokenizer, text: str, device) -> None:
    """One line per token: P(replaced) with 4 decimals, then the piece, quoted (one line even for
    a piece holding a newline)."""
    for token, probability in score_tokens(objective, tokenizer, text, device):
        print(f"{probability:.4f}  {json.dumps(tokenizer.id_to_piece(token), ensure_ascii=False)}")


# ----------------------------------------------------------------------------- infill (seq2seq)
def infill_parts(text: str) -> list[str]:
    """--infill text -> [text, text, ...]: the plain text between its sentinels, one more part than
    sentinels. The sentinels must be <extra_id_0>, <extra_id_1>, ... in that order: span
    corruption always numbers a window's spans from 0 (minilm/objectives/t5.py), so the model has
    seen no other order. A space right before a sentinel goes into the span, as a hidden word's
    first piece ("▁sat") carries its space in training (fill_mask does the same for <mask>)."""
    numbers = [int(n) for n in SENTINEL.findall(text)]
    if not numbers:
        raise UserError(f"--infill needs at least one <extra_id_0> in the text, e.g. {INFILL_EXAMPLE}")
    for expected, number in enumerate(numbers):
        if number != expected:
            raise UserError(f"--infill sentinels must be numbered in order from <extra_id_0>: "
                            f"<extra_id_{number}> is where <extra_id_{expected}> should be")
    if len(numbers) > NUM_SENTINELS:
        raise UserError(f"--infill has {len(numbers)} sentinels; the tokenizer has {NUM_SENTINELS}")
    parts = SENTINEL.split(text)[0::2]   # split() also returns the captured numbers, at odd places
    return [part[:-1] if i < len(parts) - 1 and part.endswith(" ") else part for i, part in enumerate(parts)]


def infill_input_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The encoder's input for --infill text: its plain text encoded, each sentinel by id, then eos
    (T5 appends eos to every input)."""
    parts = infill_parts(text)
    ids = []
    for i, part in enumerate(parts):
        ids += tokenizer.encode(part)
        if i < len(parts) - 1:
            ids.append(SENTINEL_IDS[i])
    return ids + [EOS_ID]


def sentinel_spans(generated_ids: list[int]) -> dict[int, list[int]]:
    """A decoder's output `<extra_id_0> span0 <extra_id_1> span1 ... eos` -> {sentinel id: span ids}.

    Read up to the first eos (all of it when there is none). Tokens before the first sentinel
    belong to no span and are dropped; a sentinel given twice keeps its first span."""
    if EOS_ID in generated_ids:
        generated_ids = generated_ids[:generated_ids.index(EOS_ID)]
    sentinels = set(SENTINEL_IDS)
    spans: dict[int, list[int]] = {}
    current = None
    for token in generated_ids:
        if token in sentinels:
            current = [] if token not in spans else None
            if current is not None:
                spans[token] = current
        elif current is not None:
            current.append(token)
    return spans


def infill_text(tokenizer: Tokenizer, text: str, generated_ids: list[int]) -> str:
    """--infill text with each sentinel replaced by the span the decoder wrote for it (nothing for
    a sentinel it skipped). The ids are joined first and decoded once, so a span's leading space
    and a character split over pieces come out as one text."""
    parts, spans = infill_parts(text), sentinel_spans(list(generated_ids))
    ids = []
    for i, part in enumerate(parts):
        ids += tokenizer.encode(part)
        if i < len(parts) - 1:
            ids += spans.get(SENTINEL_IDS[i], [])
    return tokenizer.decode(ids)


def print_infill(objective, tokenizer, args: dict, device) -> None:
    """Encode the --infill text once, decode (sampling, greedy or beam search), print the texts."""
    from minilm.objectives.t5 import DECODER_START_ID  # only a t5 checkpoint gets here
    model = objective.backbone
    ids = infill_input_ids(tokenizer, args["infill"])
    if len(ids) > model.cfg.seq_len:
        raise UserError(f"--infill text is {len(ids)} tokens with its eos, longer than the model's input window "
                        f"({model.cfg.seq_len}); shorten it")
    max_new_tokens = args["max_new_tokens"]
    if max_new_tokens > model.decoder.cfg.seq_len:
        max_new_tokens = model.decoder.cfg.seq_len
        print(f"note: the decoder writes at most {max_new_tokens} tokens (its context window); "
              f"--max_new_tokens {args['max_new_tokens']} is cut to that", file=sys.stderr)
    input_ids = torch.tensor([ids], device=device)
    shared = dict(start_id=DECODER_START_ID, eos_id=EOS_ID, use_cache=not args["no_cache"])
    if args["beam_size"] > 1:
        tokens, scores = beam_search(model, input_ids, max_new_tokens, beam_size=args["beam_size"],
                                     length_penalty=args["length_penalty"], **shared)
        count = min(args["num_samples"], args["beam_size"])
        rows, labels = tokens[0, :count], [f" (score {s:.3f})" for s in scores[0, :count].tolist()]
    else:
        # greedy has one answer, printed once
        count = 1 if args["temperature"] == 0 else args["num_samples"]
        generator = torch.Generator(device=device).manual_seed(args["seed"])
        rows = generate_seq2seq(model, input_ids, max_new_tokens, num_samples=count, temperature=args["temperature"],
                                top_k=args["top_k"], top_p=args["top_p"], generator=generator, **shared)[0]
        labels = [""] * count
    for i, (row, label) in enumerate(zip(rows.tolist(), labels)):
        print(f"--- filling {i + 1}{label}")
        print(infill_text(tokenizer, args["infill"], row))


def check_flags_fit(args: dict, name: str, model_kind: str, fills_masks: bool, ckpt: str,
                    scores_tokens: bool = False) -> None:
    """One-line UserError when the flags ask for something this checkpoint's model cannot do, naming
    the flag that fits (--prompt for decoders and prefix LMs, --fill for masked LMs, --infill for
    encoder-decoders, --score for replaced-token detectors)."""
    held = f"{ckpt} holds a {model_kind} ({name})"
    if args["score"] and not scores_tokens:
        hint = (f"use {INFILL_EXAMPLE} instead" if model_kind == "seq2seq" else
                f'use --fill "text with {MASK}" instead' if fills_masks else
                "use --prompt to generate" if model_kind in ("decoder", "prefix_decoder") else
                "it has no replaced-token detector")
        raise UserError(f"--score needs a replaced-token detection checkpoint (--objective rtd); {held}: {hint}")
    if scores_tokens and not args["score"]:
        raise UserError(f'{held}, a replaced-token detector: it cannot generate or fill in text; score text '
                        f'with --score "The chef cooked the meal."')
    if args["score"]:
        return
    if args["infill"] and model_kind != "seq2seq":
        hint = ('use --fill "text with <mask>" instead' if fills_masks else
                "use --prompt to generate" if model_kind in ("decoder", "prefix_decoder") else
                "it cannot fill in text")
        raise UserError(f"--infill needs an encoder-decoder checkpoint (--objective t5); {held}: {hint}")
    if args["fill"] and not fills_masks:
        hint = (f"use {INFILL_EXAMPLE} instead" if model_kind == "seq2seq" else
                "use --prompt to generate" if model_kind in ("decoder", "prefix_decoder") else
                "it has no masked-LM head to fill masks with")
        raise UserError(f"--fill needs a masked-LM checkpoint (--objective mlm, wwm, span or mlm+sop); {held}: {hint}")
    if args["fill"] or args["infill"]:
        return
    if model_kind == "seq2seq":
        raise UserError(f"{held}, which fills in sentinels rather than continuing a prompt: {INFILL_EXAMPLE}")
    if model_kind == "encoder":
        hint = (f'fill in masks instead: --fill "text with {MASK}"' if fills_masks else
                "and it has no masked-LM head either; its backbone is for fine-tuning")
        raise UserError(f"{ckpt} holds an encoder ({name}), which cannot generate text; {hint}")
    if model_kind not in ("decoder", "prefix_decoder"):
        raise UserError(f"{held}; text generation needs a decoder checkpoint (--objective clm or prefix_lm)")


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    args = parse_flags(argv, DEFAULTS)
    for name, rule in FLAG_RULES.items():
        check_value(name, args[name], **rule)
    given = [f"--{flag} ({kind})" for flag, kind in (("fill", "masked LMs"), ("infill", "encoder-decoders"),
                                                      ("score", "replaced-token detectors")) if args[flag]]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} exclude each other; give one")
    if args["beam_size"] > 1 and not args["infill"]:
        raise UserError("--beam_size is for --infill on an encoder-decoder checkpoint; --prompt and --fill "
                        "do not search beams")
    if args["infill"]:
        infill_parts(args["infill"])  # a malformed text is refused before the checkpoint is loaded
    device = resolve_device(args["device"])
    objective, tokenizer, cfg = load_for_inference(args["ckpt"], device)
    check_flags_fit(args, objective.name, objective.model_kind, objective.fills_masks, args["ckpt"],
                    objective.scores_tokens)
    if args["score"]:
        print_scores(objective, tokenizer, args["score"], device)
        return
    if args["fill"]:
        print_fill(objective, tokenizer, args["fill"], args["top_k"] or FILL_TOP_K, device)
        return
    if args["infill"]:
        print_infill(objective, tokenizer, args, device)
        return
    prompt_ids = [EOS_ID] + tokenizer.encode(args["prompt"])
    prompt = torch.tensor([prompt_ids] * args["num_samples"], device=device)
    generator = torch.Generator(device=device).manual_seed(args["seed"])
    out = generate(objective.backbone, prompt, args["max_new_tokens"], temperature=args["temperature"],
                   top_k=args["top_k"], top_p=args["top_p"], generator=generator,
                   use_cache=not args["no_cache"], warn=lambda msg: print(f"note: {msg}", file=sys.stderr),
                   prompt_is_prefix=objective.model_kind == "prefix_decoder")
    for i, row in enumerate(out.tolist()):
        new = row[len(prompt_ids):]
        if EOS_ID in new:
            new = new[:new.index(EOS_ID)]
        print(f"--- sample {i + 1}")
        print(tokenizer.decode(prompt_ids[1:] + new))


if __name__ == "__main__":
    run_cli(main)
