"""Sample from a checkpoint: `python sample.py [--ckpt out] [--prompt "Once"] [--num_samples 3]`.

--ckpt is a checkpoint file or a run folder (then its newest checkpoint).

The checkpoint alone is enough: it carries the config and the tokenizer. What it can do depends on
the objective it was trained with:

Decoders (--objective clm) and prefix LMs (--objective prefix_lm) continue a --prompt. Generation
starts from an end-of-document token, so the model begins as it would begin a new document, then
continues the prompt (a prefix LM reads the prompt in both directions, as in training). Each
sample stops at the first end-of-document token it produces.

flags: --ckpt --prompt --max_new_tokens --temperature --top_k --top_p --num_samples --seed --device
       --mode (ul2's mode token) --no_cache (recompute the whole prefix at every step; same tokens, slower)

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
sum of log-probabilities / length ** --length_penalty (default 1.0: larger favours longer spans;
within [-5, 5]). --max_new_tokens 0 writes no span: the text with its sentinels removed (a beam
search's one hypothesis then scores 0).

UL2 checkpoints (--objective ul2) do both: --infill as above and --prompt, whose text the encoder
reads and whose continuation the decoder writes. --mode picks the mode token the input opens with:
R ([NLU], short gaps: --infill's default), X ([NLG], long gaps) or S ([S2S], --prompt's default).

Encoders embed texts (--objective simcse or simcse_sup: the sentence vectors they were trained
for; any other encoder: the mean of its final hidden states, untrained as a sentence embedding):
    python sample.py --ckpt out --embed "A man plays a guitar." "Someone plays music." "It rains."
prints the cosine-similarity matrix of the texts' embeddings, one row per text. Every argument
after --embed up to the next --flag is one text; the other flags are checked as in every mode.

Replaced-token detectors (--objective rtd, ELECTRA's discriminator, or a combination with it such
as rtd+plm) score text instead:
    python sample.py --ckpt out --score "The chef cooked the meal."
prints one line per token: the discriminator's probability that the token was replaced (by the
generator in training), then the piece. Write a wrong word in to see it stand out.

Classifiers (--objective classify, fine-tuned on labelled rows) classify texts instead:
    python sample.py --ckpt out --classify "The match ended in a draw." ["another text" ...]
prints, for each text, every label with its probability, most probable first. They are also
evaluated on a labelled file, without training:
    python sample.py --ckpt out --evaluate test.tsv [--text_field text] [--label_field label]
classifies every row of the file (.tsv/.csv with a header, or .jsonl, read as train.py reads
labelled rows) and prints accuracy, macro-F1, each label's precision and recall, and the
confusion matrix. A label the model does not know is an error; a row with an empty text or label
is skipped and counted.
"""
from __future__ import annotations

import json
import sys

from minilm.api import (FLAG_OF, MASK, classify_texts, evaluate_file, fill, generate_texts,  # noqa: F401 (re-exported)
                        hint, holds, infill_decode, infill_input_ids, infill_parts, infill_text, load_for_inference,
                        needs, part_serving, score_tokens, sentinel_spans, served)
from minilm.api import fill_mask as api_fill_mask
from minilm.cli import run_cli
from minilm.config import check_value, parse_flags
from minilm.errors import UserError
from minilm.generate import LENGTH_PENALTY_RANGE
from minilm.trainer import resolve_device

DEFAULTS = dict(ckpt="out", prompt="", max_new_tokens=100, temperature=0.8, top_k=0, top_p=0.95,
                num_samples=3, seed=0, device="auto", no_cache=False, fill="", infill="", beam_size=1,
                length_penalty=1.0, score="", mode="", evaluate="", text_field="text", label_field="label")
# what each number accepts (config.check_value): a one-line error naming the flag otherwise
FLAG_RULES = dict(max_new_tokens=dict(at_least=0), num_samples=dict(at_least=1),
                  temperature=dict(at_least=0),          # 0 = greedy
                  top_k=dict(at_least=0),                # 0 = off
                  top_p=dict(within="(0, 1]"), seed=dict(within="[0, 2**64)"),
                  beam_size=dict(at_least=1), length_penalty=dict(within=LENGTH_PENALTY_RANGE))
FILL_TOP_K = 5  # --top_k when filling and none is given
# The work is minilm/api.py's (the Python API); this script reads flags, calls it and prints.


def fill_mask(objective, tokenizer, text: str, top_k: int, device):
    """minilm.api.fill_mask, its errors worded as --fill's."""
    return api_fill_mask(objective, tokenizer, text, top_k, device, flags=True)


def print_fill(objective, tokenizer, text: str, top_k: int, device) -> None:
    """For every <mask>, its candidates with their probabilities, then the filled text; each text
    quoted (one line even when a guess is "\n")."""
    filled = fill(objective, tokenizer, text, top_k, device, flags=True)
    show = lambda piece: json.dumps(piece, ensure_ascii=False)  # noqa: E731
    for i, candidates in enumerate(filled.candidates):
        print(f"{MASK} {i + 1} of {len(filled.candidates)}:")
        for candidate in candidates:
            print(f"  {candidate.probability:.4f}  {show(candidate.text)}")
    print(f"filled: {show(filled.text)}")


def print_scores(objective, tokenizer, text: str, device) -> None:
    """One line per token: P(replaced) with 4 decimals, then the piece, quoted (one line even for
    a piece holding a newline)."""
    for token, probability in score_tokens(objective, tokenizer, text, device, flags=True):
        print(f"{probability:.4f}  {json.dumps(tokenizer.id_to_piece(token), ensure_ascii=False)}")


def print_infill(objective, tokenizer, args: dict, device) -> None:
    """Encode the --infill text once, decode (sampling, greedy or beam search), print the texts."""
    texts, scores = infill_decode(objective, tokenizer, args["infill"], max_new_tokens=args["max_new_tokens"],
                                  temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"],
                                  num_samples=args["num_samples"], seed=args["seed"], beam_size=args["beam_size"],
                                  length_penalty=args["length_penalty"], device=device,
                                  use_cache=not args["no_cache"], flags=True, mode=args["mode"],
                                  warn=lambda msg: print(msg, file=sys.stderr))
    labels = [f" (score {s:.3f})" for s in scores] if scores is not None else [""] * len(texts)
    for i, (text, label) in enumerate(zip(texts, labels)):
        print(f"--- filling {i + 1}{label}")
        print(text)


# --- classify: --classify takes one text or more, up to the next flag ---
CLASSIFY_EXAMPLE = '--classify "The match ended in a draw."'


def take_texts(argv: list[str], flag: str) -> tuple[list[str], list[str] | None]:
    """(argv without --FLAG and its texts, the texts or None when --FLAG is absent): every argument
    after --FLAG up to the next --option is a text (--FLAG=TEXT gives the first), so --classify "a"
    "b" --top_k 3 -> ["--top_k", "3"], ["a", "b"]. Used by --classify and --embed."""
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" or arg.startswith(f"--{flag}="):
            end = i + 1
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            return argv[:i] + argv[end:], ([arg.partition("=")[2]] if "=" in arg else []) + argv[i + 1:end]
    return argv, None


def print_classes(objective, tokenizer, texts: list[str], device) -> None:
    """For each text, a header line with the text (quoted), then every label and its probability,
    most probable first."""
    for i, (text, ranked) in enumerate(zip(texts, classify_texts(objective, tokenizer, texts, device, flags=True))):
        print(f"--- text {i + 1}: {json.dumps(text, ensure_ascii=False)}")
        for label, probability in ranked:
            print(f"  {probability:.4f}  {label}")
# --- end classify ---


def flag_asked(args: dict) -> str:
    """The method the flags ask for: evaluate, classify, embed, score, infill, fill, or generate
    (--prompt, or no flag)."""
    return next((method for method in ("evaluate", "classify", "embed", "score", "infill", "fill") if args.get(method)),
                "generate")


def check_flags_fit(args: dict, objective, ckpt: str) -> None:
    """One-line UserError when the flags ask for something this checkpoint (`objective`: a loaded
    one, or an objective class) cannot do: what the flag needs, and what the checkpoint does serve
    (minilm.api.served, from the objective's declared capabilities; --score only for
    replaced-token detectors)."""
    asked = flag_asked(args)
    verb = "classify" if asked == "evaluate" else asked   # --evaluate classifies every row of its file
    if verb in served(objective, flags=True):
        return
    held = holds(ckpt, objective.model_kind, objective.name)
    if asked == "generate":
        raise UserError(f"{held}, which cannot generate text: that needs {needs('generate', flags=True)}; "
                        f"{hint(objective, True)}")
    flag = "--evaluate" if asked == "evaluate" else f"--{FLAG_OF[asked]}"
    raise UserError(f"{flag} needs {needs(verb, flags=True)}; {held}: {hint(objective, True)}")


# ---- --embed "a" "b" ... prints the cosine-similarity matrix of the texts' embeddings
def print_embeddings(args: dict, texts: list[str]) -> None:
    """Load the checkpoint, embed the texts (minilm.api), print their cosine similarities: a header
    of column numbers, then per text its row and the text, quoted."""
    from minilm.api import cosine_similarities, embed_texts
    if not texts:
        raise UserError('--embed needs at least one text, e.g. --embed "A man plays a guitar." "Someone plays music."')
    others = [f"--{flag}" for flag in ("prompt", "fill", "infill", "score", "classify", "evaluate") if args[flag]]
    if others:
        raise UserError(f"--embed and {others[0]} exclude each other; give one")
    device = resolve_device(args["device"])
    objective, tokenizer, _ = load_for_inference(args["ckpt"], device)
    check_flags_fit(dict(args, embed=texts), objective, args["ckpt"])
    similarity = cosine_similarities(embed_texts(objective, tokenizer, texts, device)).tolist()
    embedder = part_serving(objective, "embed")
    how = (f"{embedder.pooling} pooling" if embedder.embeds_sentences
           else "mean of the final hidden states: not trained as a sentence embedding")
    print(f"cosine similarity of {len(texts)} texts ({objective.name}, {how}):")
    print("    " + "".join(f"{j + 1:>7}" for j in range(len(texts))))
    for i, (row, text) in enumerate(zip(similarity, texts)):
        print(f"{i + 1:>4}" + "".join(f"{value:>7.3f}" for value in row) + "  " + json.dumps(text, ensure_ascii=False))


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    argv, texts_to_classify = take_texts(argv, "classify")   # both take several texts
    argv, texts_to_embed = take_texts(argv, "embed")
    args = parse_flags(argv, DEFAULTS)
    if texts_to_classify is not None and not texts_to_classify:
        raise UserError(f"--classify needs a text or more, e.g. {CLASSIFY_EXAMPLE}")
    args["classify"] = texts_to_classify or []
    for name, rule in FLAG_RULES.items():   # every mode, --embed included, refuses a bad number
        check_value(name, args[name], **rule)
    given = [f"--{flag} ({kind})" for flag, kind in (("fill", "masked LMs"), ("infill", "encoder-decoders"),
                                                      ("score", "replaced-token detectors"),
                                                      ("classify", "classifiers"), ("evaluate", "classifiers"))
             if args[flag]]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} exclude each other; give one")
    if args["beam_size"] > 1 and not args["infill"]:
        raise UserError("--beam_size is for --infill on an encoder-decoder checkpoint; --prompt and --fill "
                        "do not search beams")
    if args["mode"] and (texts_to_embed is not None or args["fill"] or args["score"] or args["classify"]
                         or args["evaluate"]):
        raise UserError("--mode picks the mode token an --infill or --prompt input opens with; --fill, --score, "
                        "--embed, --classify and --evaluate have none")
    if not args["evaluate"] and any(args[field] != DEFAULTS[field] for field in ("text_field", "label_field")):
        raise UserError("--text_field and --label_field name the columns of --evaluate's file; give --evaluate FILE "
                        "or leave them out")
    if texts_to_embed is not None:
        print_embeddings(args, texts_to_embed)
        return
    if args["infill"]:
        infill_parts(args["infill"], flags=True)  # a malformed text is refused before the checkpoint is loaded
    device = resolve_device(args["device"])
    objective, tokenizer, cfg = load_for_inference(args["ckpt"], device)
    check_flags_fit(args, objective, args["ckpt"])
    if args["evaluate"]:
        print(evaluate_file(objective, tokenizer, args["evaluate"], text_field=args["text_field"],
                            label_field=args["label_field"], device=device, flags=True).report())
        return
    if args["classify"]:
        print_classes(objective, tokenizer, args["classify"], device)
        return
    if args["score"]:
        print_scores(objective, tokenizer, args["score"], device)
        return
    if args["fill"]:
        print_fill(objective, tokenizer, args["fill"], args["top_k"] or FILL_TOP_K, device)
        return
    if args["infill"]:
        print_infill(objective, tokenizer, args, device)
        return
    texts = generate_texts(objective, tokenizer, args["prompt"], max_new_tokens=args["max_new_tokens"],
                           temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"],
                           num_samples=args["num_samples"], seed=args["seed"], device=device,
                           use_cache=not args["no_cache"], warn=lambda msg: print(f"note: {msg}", file=sys.stderr),
                           mode=args["mode"], flags=True)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}")
        print(text)

if __name__ == "__main__":
    run_cli(main)
