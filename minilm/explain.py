"""See what an objective does to a sentence: its input, its targets and every attention mask.

The explanation is the training batch: the sentence becomes one row of the data the objective
reads, the objective's own make_batch turns it into a batch with the seed's generator, and the
objective's `explain` (in its own file) says what that batch means, position by position, with the
masks built by the same functions its forward calls. Nothing here re-implements a masking rule.

    python -m minilm.explain --objective mlm "The cat sat on the mat." [--seed 1] [--mask_prob 0.3]
    python -m minilm.explain --ckpt out "Some sentence." --png mlm.png
    python -m minilm.explain --gallery docs/          # docs/explainer.md and docs/explainer/*.png

    import minilm
    e = minilm.explain("t5", "The cat sat on the mat.", seed=0)
    e.columns["reads"], e.decoder["target"], e.masks      # the same views, as data
    print(e.table())

How a sentence becomes one row (`one_row`), per kind of data (the objective's `data`):
    blocks         the sentence's ids and the <eos> preparation puts after every document, as one
                   window; an objective that reads right-padded rows gets <pad> and the row's
                   length past it, one that reads fixed windows (t5's is longer than its input)
                   reads the stream on into the sentence again, as a window runs on into the
                   next document
    segment_pairs  [CLS] A [SEP] B [SEP] (segment_pairs.pack_pairs): A the first half of the
                   sentences (segment_pairs.split_sentences), B the rest, or `text_pair`
    sentences      [CLS] sentence [SEP] (sentences.frame_sentences); `text_pair` as its neighbour
    pairs          anchor and positive, each [CLS] text [SEP]: the two halves, or text, text_pair
    parallel       <eos> source <eos> <eos> target <eos> (parallel.pack_translation)
    labelled       [CLS] text [SEP] with label 0 (the framing of data/labelled.py)
Without --seq_len the row is as long as the sentence needs (the model's context with --ckpt).
Without --ckpt the model is a small untrained one and the tokenizer a throwaway one trained on the
built-in corpus (once per process), or --tokenizer's.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field

import torch

from minilm.model import causal_mask

DASH = "\u2013"   # "nothing predicted here"


@dataclass
class Explained:
    """What one row of an objective's batch means (Objective.explain).

    columns  column title -> one string per input position, in order: always "reads" (the piece
             the model reads there) and "target" (DASH where nothing is predicted), then the
             objective's own columns
    decoder  encoder-decoders: "reads" and "target" per decoder position; None otherwise
    masks    title -> (query labels, key labels, (Q, K) bool tensor, True = may attend): every
             attention mask the model receives for the row, from the functions forward uses
    notes    one-line facts worth looking at"""
    columns: dict[str, list[str]]
    decoder: dict[str, list[str]] | None = None
    masks: dict[str, tuple[list[str], list[str], torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def pieces(tokenizer, ids) -> list[str]:
    """Token ids (a 1-D tensor or list) -> their pieces, specials by name (<mask>, <eos>, ...)."""
    return [tokenizer.id_to_piece(int(i)) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]


def targets(tokenizer, labels, ignore: int) -> list[str]:
    """A row of labels (IGNORE where nothing is predicted) -> pieces, DASH at the ignored."""
    return [DASH if int(i) == ignore else tokenizer.id_to_piece(int(i)) for i in labels.tolist()]


def add_predictions(explained: Explained, predicted, tokenizer) -> None:
    """A "predicts" column beside the target column (the decoder's, where there is one): the
    model's best guess (Objective.predictions, (T,) ids) where a target is shown, DASH elsewhere.
    Nothing when the objective does not say."""
    if predicted is None:
        return
    table = explained.decoder if explained.decoder and "target" in explained.decoder else explained.columns
    shown = pieces(tokenizer, predicted)
    table["predicts"] = [DASH if target == DASH else guess for target, guess in zip(table["target"], shown)]


def mask_grid(mask, queries: int, keys: int) -> torch.Tensor:
    """A mask as attention() takes it, for row 0 of the batch -> the (queries, keys) bool grid it
    means, True = may attend: None (every key), CAUSAL (model.causal_mask, what attention() turns
    it into), or a bool tensor broadcast to (B, H, queries, keys) (a padding mask (B, 1, 1, S))."""
    if mask is None:
        return torch.ones(queries, keys, dtype=torch.bool)
    if isinstance(mask, str):
        return causal_mask(queries, keys)
    return torch.broadcast_to(mask[:1], (1, 1, queries, keys))[0, 0].cpu()


# ----------------------------------------------------------------------------- the explanation
@dataclass
class Explanation(Explained):
    """Explained plus what it was made from: the objective, the sentence, the seed, the `raw` row
    the data source would have produced, `lengths` (its real raw tokens, passed to make_batch
    where the row is right-padded, else None), `seq_len` (the row's context) and the `batch`
    make_batch made of it (B == 1)."""
    objective: str = ""
    text: str = ""
    seed: int = 0
    raw: object = None
    lengths: object = None
    seq_len: int = 0
    batch: dict = field(default_factory=dict)

    def table(self) -> str:
        """One aligned row per input position (its index, then the columns), then the decoder's
        rows, then the notes."""
        out = [_aligned(self.columns)]
        if self.decoder:
            out += ["", "decoder:", _aligned(self.decoder)]
        if self.notes:
            out += [""] + [f"* {note}" for note in self.notes]
        return "\n".join(out)

    def mask_grids(self) -> str:
        """Every mask as a character grid: a row per query, `x` where it may attend, `.` where not."""
        return "\n\n".join(_grid(title, *mask) for title, mask in self.masks.items())

    def render(self, masks: bool | None = None) -> str:
        """What the command prints: the table, and the masks when `masks` (None: when every mask
        is at most SHORT_MASK keys wide, so the grids fit a terminal)."""
        if masks is None:
            masks = all(m[2].shape[-1] <= SHORT_MASK for m in self.masks.values())
        head = f"{self.objective}, seed {self.seed}: {self.text!r}"
        return "\n\n".join([head, self.table()] + ([self.mask_grids()] if masks and self.masks else []))

    def save_png(self, path: str) -> str:
        """The token table and every mask as a labelled grid, in one PNG (matplotlib). Returns path."""
        plt = _pyplot()
        rows = _rows(self.columns)
        decoder_rows = _rows(self.decoder) if self.decoder else None
        masks = list(self.masks.items())
        n_tables = 1 + (decoder_rows is not None)
        table_height = [0.4 + 0.19 * len(rows)] + ([0.4 + 0.19 * len(decoder_rows)] if decoder_rows else [])
        # three square grids a row, each as wide as its keys need (0.22 in a key) up to a third of the page
        keys = max([m[2].shape[-1] for _, m in masks] + [0])
        width = max(8.0, 1.6 * len(self.columns) + 1, min(len(masks), 3) * (1.5 + 0.22 * keys))
        mask_size = min(1.5 + 0.22 * keys, width / 3) + 1.0     # + the labels under it
        grid_rows = -(-len(masks) // 3)
        heights = table_height + [mask_size] * grid_rows
        import textwrap
        notes = [line for note in self.notes for line in textwrap.wrap(note, int(width * 13))]
        fig = plt.figure(figsize=(width, sum(heights) + 0.16 * len(notes) + 0.4))
        spec = fig.add_gridspec(len(heights), 3, height_ratios=heights)
        for i, (title, table_rows, header) in enumerate(
                [("input", rows, ["#"] + list(self.columns))]
                + ([("decoder", decoder_rows, ["#"] + list(self.decoder))] if decoder_rows else [])):
            ax = fig.add_subplot(spec[i, :])
            ax.axis("off")
            ax.set_title(f"{self.objective} ({title}), seed {self.seed}" if i == 0 else title, loc="left", fontsize=9)
            chars = [max(len(r[c]) for r in [header] + table_rows) + 2 for c in range(len(header))]
            cells = ax.table(cellText=table_rows, colLabels=header, loc="upper left", cellLoc="left",
                             colWidths=[c / sum(chars) for c in chars])
            cells.auto_set_font_size(False)
            cells.set_fontsize(7)
        for k, (title, (queries, keys, mask)) in enumerate(masks):
            ax = fig.add_subplot(spec[n_tables + k // 3, k % 3])
            ax.imshow(mask.to(torch.float32).numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{title}\n(dark = may attend)", fontsize=8)
            ax.set_xticks(range(len(keys)), [_shown(p) for p in keys], rotation=90, fontsize=6)
            ax.set_yticks(range(len(queries)), [_shown(p) for p in queries], fontsize=6)
            ax.set_xlabel("key (attended to)", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
        if notes:
            fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, va="bottom")
        fig.tight_layout(rect=(0, (0.16 * len(notes) + 0.1) / fig.get_figheight(), 1, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


SHORT_MASK = 32   # masks this wide or narrower are printed without --masks


def _shown(piece: str) -> str:
    """A piece as one visible line: newlines and tabs spelled out."""
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _rows(columns: dict[str, list[str]]) -> list[list[str]]:
    n = max(len(v) for v in columns.values())
    return [[str(i)] + [_shown(col[i]) if i < len(col) else "" for col in columns.values()] for i in range(n)]


def _aligned(columns: dict[str, list[str]]) -> str:
    header = ["#"] + list(columns)
    rows = _rows(columns)
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    line = lambda r: "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()   # noqa: E731
    return "\n".join([line(header)] + [line(r) for r in rows])


def _grid(title: str, queries: list[str], keys: list[str], mask: torch.Tensor) -> str:
    width = max([len(_shown(q)) for q in queries] + [1])
    tens = " " * (width + 1) + "".join(str(j // 10) if j >= 10 else " " for j in range(len(keys)))
    ones = " " * (width + 1) + "".join(str(j % 10) for j in range(len(keys)))
    rows = [f"{_shown(q).rjust(width)} " + "".join("x" if v else "." for v in mask[i].tolist())
            for i, q in enumerate(queries)]
    return "\n".join([f"{title} (row = query, column = key by position, x = may attend):"]
                     + ([tens] if len(keys) > 10 else []) + [ones] + rows)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from minilm.errors import UserError
        raise UserError('--png needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') from None
    return plt


# ----------------------------------------------------------------------------- sentence -> one row
GALLERY_SEED = 4   # a seed whose draws show each objective's parts on GALLERY_SENTENCE (prefix_lm: 9 of 17)
GALLERY_SENTENCE = "The function returns a new list. It raises an error when the list is empty."
SMALL_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64}   # an untrained model: explaining costs nothing
THROWAWAY_VOCAB = 4096
LONGEST_FITTED = 512   # without --seq_len or --ckpt, the longest row fitted to a sentence
THROWAWAY_DOCS = 400   # about 1.8 MB of the built-in corpus: half a second of training


@functools.lru_cache(maxsize=1)
def throwaway_tokenizer():
    """A small tokenizer trained on the first documents of the built-in corpus, once per process."""
    from minilm.data import builtin_documents
    from minilm.tokenizer import Tokenizer
    docs = []
    for doc in builtin_documents():
        docs.append(doc)
        if len(docs) == THROWAWAY_DOCS:
            break
    return Tokenizer.train(docs, vocab_size=THROWAWAY_VOCAB)


def _halves(text: str, text_pair: str | None, tokenizer, name: str, why: str) -> tuple[str, str]:
    """(first, second) texts for an objective that reads pairs: text and text_pair, or the sentences
    of text cut in two by the data sources' own splitter (segment_pairs.split_sentences)."""
    import numpy as np
    from minilm.data.segment_pairs import split_sentences
    from minilm.errors import UserError
    if text_pair is not None:
        return text, text_pair
    ids = tokenizer.encode(text)
    starts, _, _ = split_sentences(np.asarray(ids, dtype=np.int64), tokenizer)
    if len(starts) < 2:
        raise UserError(f"{name} reads {why}, and {text!r} is one sentence: give two sentences "
                        "(or text_pair / --text_pair)")
    cut = int(starts[(len(starts) + 1) // 2])
    return tokenizer.decode(ids[:cut]).strip(), tokenizer.decode(ids[cut:]).strip()


def _too_long(name: str, n: int, seq_len: int, what: str):
    from minilm.errors import UserError
    return UserError(f"the sentence is {n} tokens as {what}, longer than --seq_len {seq_len} allows for {name}; "
                     "give a shorter sentence or a larger --seq_len")


def row_blocks(cls, tokenizer, text, text_pair, seq_len, model_seq_len, options, fixed_window):
    """(raw (1, W), make_batch's extra keyword arguments, seq_len, notes) for "blocks" data."""
    from minilm.tokenizer import EOS_ID, PAD_ID
    ids = tokenizer.encode(text if text_pair is None else text + " " + text_pair) + [EOS_ID]
    window = functools.partial(_window_length, cls, options)
    notes = []
    if seq_len is None:
        seq_len = model_seq_len if fixed_window and model_seq_len else _fit(window, len(ids))
    W = window(seq_len)
    if len(ids) > W:
        raise _too_long(cls.name, len(ids) - 1, seq_len, "a window with its <eos>")
    extra = {}
    if len(ids) < W and cls.reads_padded_rows and not fixed_window:
        extra["lengths"] = torch.tensor([len(ids)])
        ids = ids + [PAD_ID] * (W - len(ids))
        notes.append(f"row padded to {W} raw tokens (the row's length, {int(extra['lengths'])}, goes to make_batch)")
    elif len(ids) < W:
        notes.append(f"the window of {W} raw tokens runs on into the sentence again after its <eos>, "
                     "as a window of blocks data runs on into the next document")
        ids = (ids * (W // len(ids) + 1))[:W]
    return torch.tensor([ids]), extra, seq_len, notes


def row_segment_pairs(cls, tokenizer, text, text_pair, seq_len, model_seq_len, options, fixed_window):
    from minilm.data.segment_pairs import pack_pairs
    first, second = _halves(text, text_pair, tokenizer, cls.name, "a pair of sentence runs [CLS] A [SEP] B [SEP]")
    a, b = tokenizer.encode(first), tokenizer.encode(second)
    seq_len = seq_len or max(len(a) + len(b) + 3, 5)
    if len(a) + len(b) + 3 > seq_len:
        raise _too_long(cls.name, len(a) + len(b) + 3, seq_len, "[CLS] A [SEP] B [SEP]")
    flat = torch.tensor(a + b)
    n_a, n_b = torch.tensor([len(a)]), torch.tensor([len(b)])
    input_ids, segment_ids, lengths = pack_pairs(flat, torch.tensor([0]), n_a, n_a, n_b, seq_len)
    raw = {"input_ids": input_ids, "segment_ids": segment_ids, "lengths": lengths, "a_lengths": n_a,
           "b_lengths": n_b, "documents": torch.tensor([0])}
    return raw, {}, seq_len, [f"A = {first!r}, B = {second!r}, in document order"]


def _framed(tokenizer, text, seq_len):
    from minilm.data.sentences import frame_sentences
    ids = tokenizer.encode(text)
    return frame_sentences(torch.tensor([ids]).reshape(1, -1), torch.tensor([len(ids)]), seq_len)


def row_sentences(cls, tokenizer, text, text_pair, seq_len, model_seq_len, options, fixed_window):
    texts = [text] + ([text_pair] if text_pair is not None else [])
    longest = max(len(tokenizer.encode(t)) for t in texts) + 2
    seq_len = seq_len or max(longest, 3)
    if longest > seq_len:
        raise _too_long(cls.name, longest, seq_len, "[CLS] sentence [SEP]")
    input_ids, lengths = _framed(tokenizer, text, seq_len)
    neighbour_ids, neighbour_lengths = _framed(tokenizer, texts[-1], seq_len)
    raw = {"input_ids": input_ids, "lengths": lengths, "neighbour_ids": neighbour_ids,
           "neighbour_lengths": neighbour_lengths, "has_neighbour": torch.tensor([text_pair is not None]),
           "documents": torch.tensor([0])}
    return raw, {}, seq_len, []


def row_pairs(cls, tokenizer, text, text_pair, seq_len, model_seq_len, options, fixed_window):
    anchor, positive = _halves(text, text_pair, tokenizer, cls.name, "(anchor, positive) pairs")
    longest = max(len(tokenizer.encode(t)) for t in (anchor, positive)) + 2
    seq_len = seq_len or max(longest, 3)
    if longest > seq_len:
        raise _too_long(cls.name, longest, seq_len, "[CLS] text [SEP]")
    views = [_framed(tokenizer, t, seq_len) for t in (anchor, positive)]
    raw = {"input_ids": torch.stack([v[0] for v in views], dim=1), "lengths": torch.stack([v[1] for v in views], dim=1)}
    return raw, {}, seq_len, [f"anchor {anchor!r}, positive {positive!r}"]


def row_parallel(cls, tokenizer, text, text_pair, seq_len, model_seq_len, options, fixed_window):
    from minilm.data.parallel import SEPARATORS, pack_monolingual, pack_translation
    source, target = _halves(text, text_pair, tokenizer, cls.name, "translation pairs (a source and its translation)")
    a, b = tokenizer.encode(source), tokenizer.encode(target)
    seq_len = seq_len or len(a) + len(b) + SEPARATORS
    if len(a) + len(b) + SEPARATORS > seq_len:
        raise _too_long(cls.name, len(a) + len(b) + SEPARATORS, seq_len, "<eos> source <eos> <eos> target <eos>")
    n_a, n_b = torch.tensor([len(a)]), torch.tensor([len(b)])
    raw = pack_translation(torch.tensor([a]), n_a, torch.tensor([b]), n_b, seq_len)
    raw.update(source_lengths=n_a, target_lengths=n_b, rows=torch.tensor([0]),
               monolingual=pack_monolingual(torch.tensor([a]), n_a, torch.tensor([0]), seq_len))
    return raw, {}, seq_len, [f"language 0 {source!r}, language 1 {target!r}"]


def row_labelled(cls, tokenizer, text, text_pair, seq_len, model_seq_len, options, fixed_window):
    longest = len(tokenizer.encode(text)) + 2
    seq_len = seq_len or max(longest, 3)
    if longest > seq_len:
        raise _too_long(cls.name, longest, seq_len, "[CLS] text [SEP]")
    input_ids, lengths = _framed(tokenizer, text, seq_len)
    raw = {"input_ids": input_ids, "lengths": lengths, "labels": torch.tensor([0]),
           "row_valid": torch.tensor([True]), "rows": torch.tensor([0])}
    return raw, {}, seq_len, ["label 0 (a row of labelled data carries one; the sentence has none)"]


# data kind (Objective.data) -> how one sentence becomes one row of it
ROW_BUILDERS = {"blocks": row_blocks, "segment_pairs": row_segment_pairs, "sentences": row_sentences,
                "pairs": row_pairs, "parallel": row_parallel, "labelled": row_labelled}


def _window_length(cls, options, seq_len: int) -> int:
    from minilm.config import ModelConfig
    return cls.window_length(ModelConfig(seq_len=seq_len), options)


def _fit(window, n: int) -> int:
    """The smallest seq_len whose window holds n raw tokens."""
    from minilm.errors import UserError
    for seq_len in range(1, 4 * n + 64):
        try:
            if window(seq_len) >= n:
                return seq_len
        except UserError:   # below the objective's shortest seq_len
            continue
    raise UserError(f"no --seq_len fits {n} tokens")


def _has_own_window(cls) -> bool:
    """Whether the objective reads windows of its own length (t5's, longer than its input), which
    its make_batch checks: a checkpoint's model then reads exactly its own window."""
    from minilm.objectives.base import Objective
    return getattr(cls.window_length, "__func__", None) is not Objective.window_length.__func__


# ----------------------------------------------------------------------------- the API
def objective_options(cls, given: dict | None):
    """cls.Options from `given` (flag name -> value, typed or as the command line's strings),
    validated: a one-line UserError for a name that is no option of the objective."""
    import difflib

    from minilm.config import _convert
    from minilm.errors import UserError
    from minilm.options import TYPES, type_name
    if given is None:
        return cls.make_options(None)
    if dataclasses.is_dataclass(given) and not isinstance(given, dict):
        return cls.make_options(given)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    values = {}
    for name, value in given.items():
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            own = ", ".join(f"--{f}" for f in fields) or "none"
            raise UserError(f"--{name} is no option of {cls.name}" + (f"; did you mean --{close[0]}?" if close else "")
                            + f" (its options: {own})")
        kind = TYPES[type_name(fields[name])]
        values[name] = _convert(name, value, kind) if isinstance(value, str) and kind is not str else value
    options = cls.Options(**values)
    options.validate()
    return options


def explain(objective_name: str | None, text: str, *, ckpt: str | None = None, tokenizer=None, seed: int = 0,
            options: dict | None = None, seq_len: int | None = None, text_pair: str | None = None) -> Explanation:
    """What objective `objective_name` does to `text`: an Explanation (the columns per position, the
    decoder's, every attention mask, notes, and the raw row and batch they come from).

    ckpt       a checkpoint file or run folder: its tokenizer, model and options (objective_name
               may be None; another objective's name is a UserError)
    tokenizer  a minilm Tokenizer or the path of a tokenizer.model (without ckpt)
    seed       the generator make_batch draws its choices from (and the untrained model's init)
    options    the objective's own options, {"mask_prob": 0.3, ...} (its Options fields)
    seq_len    the row's context; None: as long as the sentence needs (the checkpoint's at most)
    text_pair  the second text of objectives that read pairs (else the sentences of text, halved)"""
    from minilm.config import ModelConfig
    from minilm.errors import UserError
    from minilm.objectives import build_objective, objective_class
    if not isinstance(text, str) or not text.strip():
        raise UserError("explain needs a sentence: got an empty one")
    if text_pair is not None and not text_pair.strip():
        raise UserError("text_pair is empty: give a second sentence or leave it out")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
    model, model_seq_len = None, None
    if ckpt is not None:
        from minilm.api import load_for_inference
        if tokenizer is not None:
            raise UserError("a checkpoint carries its own tokenizer: leave out --tokenizer with --ckpt")
        model, tokenizer, cfg = load_for_inference(os.fspath(ckpt), torch.device("cpu"), flag="--ckpt")
        saved = model.name
        if objective_name is not None and objective_name != saved:
            raise UserError(f"{ckpt} is a checkpoint of --objective {saved}, not {objective_name}; leave out "
                            f"--objective or give --objective {saved}")
        if options:
            raise UserError(f"options come from the checkpoint ({saved}'s own); leave out {', '.join(options)}")
        objective_name, model_seq_len = saved, cfg.model.seq_len
        if seq_len is not None and seq_len > model_seq_len:
            raise UserError(f"--seq_len {seq_len} is longer than the checkpoint's context, {model_seq_len}")
    if objective_name is None:
        raise UserError("name an objective (--objective NAME) or give a checkpoint (--ckpt PATH)")
    if "+" in objective_name:
        raise UserError(f"explain shows one objective at a time: explain each of {objective_name.replace('+', ', ')}")
    cls = objective_class(objective_name)
    if tokenizer is None:
        tokenizer = throwaway_tokenizer()
    elif isinstance(tokenizer, (str, os.PathLike)):
        from minilm.tokenizer import tokenizer_from_bytes
        if not os.path.isfile(tokenizer):
            raise UserError(f"--tokenizer {tokenizer}: no such file (a tokenizer.model from train.py)")
        with open(tokenizer, "rb") as f:
            tokenizer = tokenizer_from_bytes(f.read())
    option_values = model.options if model is not None and hasattr(model, "options") else objective_options(cls, options)
    fixed_window = _has_own_window(cls) and model is not None
    raw, extra, row_seq_len, notes = ROW_BUILDERS[cls.data](cls, tokenizer, text, text_pair, seq_len,
                                                            model_seq_len, option_values, fixed_window)
    if model_seq_len is not None and row_seq_len > model_seq_len:
        raise _too_long(cls.name, row_seq_len, model_seq_len, "one row")
    if seq_len is None and model_seq_len is None and row_seq_len > LONGEST_FITTED:
        raise UserError(f"the sentence needs a context of {row_seq_len} tokens for {cls.name}; the explainer fits "
                        f"rows of up to {LONGEST_FITTED} by itself: give a shorter sentence or --seq_len {row_seq_len}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=row_seq_len, **SMALL_MODEL)
            model = build_objective(objective_name, cfg, tokenizer, option_values)
        # the training batch, in training mode (simcse's two views, dropout where the model has any)
        model.train()
        generator = torch.Generator().manual_seed(seed)
        batch = model.make_batch(raw, generator, **extra)
        with torch.no_grad():
            explained = model.explain(batch, tokenizer)
            if ckpt is not None:   # a trained model: what it predicts at the targets (dropout off)
                model.eval()
                add_predictions(explained, model.predictions(batch), tokenizer)
    return Explanation(columns=explained.columns, decoder=explained.decoder, masks=explained.masks,
                       notes=notes + list(explained.notes), objective=objective_name, text=text, seed=seed,
                       raw=raw, lengths=extra.get("lengths"), seq_len=row_seq_len, batch=batch)


# ----------------------------------------------------------------------------- the gallery
GALLERY_INTRO = """# What each objective does to a sentence

Every objective of minilm on one sentence, made by `python -m minilm.explain --gallery docs/`
(an untrained model, a throwaway tokenizer trained on the built-in corpus, seed {seed}). Each table is
the objective's own training batch for that sentence, position by position; each picture shows it
again with every attention mask the model receives. Try your own sentence, seed and options with
`python -m minilm.explain --objective NAME "your sentence" --seed 1` (any of the objective's flags,
`--mask_prob 0.3`, say). A test regenerates the text below and compares it with this file: after
changing an objective, run the command again and commit the result.
"""


def _about(cls) -> str:
    """The first paragraph of the objective's module docstring, on one line."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


def gallery_entries(sentence: str = GALLERY_SENTENCE):
    """(name, Explanation or the one-line reason it has none) for every registered objective."""
    from minilm.errors import UserError
    from minilm.objectives import OBJECTIVES
    out = []
    for name in OBJECTIVES:
        try:
            out.append((name, explain(name, sentence, seed=GALLERY_SEED)))
        except UserError as err:
            out.append((name, str(err)))
    return out


def gallery_markdown(entries, png_folder: str = "explainer") -> str:
    """The gallery page: per objective its one-paragraph summary, what to look at (its notes), its
    table and its picture. Pure text, so the test can compare it with the committed page."""
    from minilm.objectives import OBJECTIVES
    lines = [GALLERY_INTRO.format(seed=GALLERY_SEED), f"The sentence: {GALLERY_SENTENCE!r}. Python {sys.version_info[0]}.{sys.version_info[1]} "
             "(the built-in corpus, and so the tokenizer, comes from its standard library).", ""]
    for name, entry in entries:
        lines += [f"## {name}", "", _about(OBJECTIVES[name]), ""]
        if isinstance(entry, str):
            lines += [f"Not shown without a checkpoint: {entry}", ""]
            continue
        lines += ["```", entry.table(), "```", ""]
        masks = f" and its attention masks ({', '.join(entry.masks)})" if entry.masks else ""
        lines += [f"![{name}: its rows{masks}]({png_folder}/{name}.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_gallery(folder: str, pngs: bool = True, log=print) -> str:
    """folder/explainer.md and, with pngs, folder/explainer/NAME.png. Returns the markdown's path."""
    entries = gallery_entries()
    os.makedirs(os.path.join(folder, "explainer"), exist_ok=True)
    if pngs:
        for name, entry in entries:
            if not isinstance(entry, str):
                entry.save_png(os.path.join(folder, "explainer", f"{name}.png"))
    path = os.path.join(folder, "explainer.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(gallery_markdown(entries))
    log(f"wrote {path}" + (f" and {os.path.join(folder, 'explainer')}/*.png" if pngs else ""))
    return path


# ----------------------------------------------------------------------------- the command
USAGE = ('usage: python -m minilm.explain --objective NAME "sentence" [--text_pair "second"] [--ckpt PATH] '
         "[--tokenizer PATH] [--seed N] [--seq_len N] [--masks] [--png FILE] [--OPTION VALUE ...]\n"
         "       python -m minilm.explain --gallery DIR [--no_png]")
OWN_FLAGS = {"objective": None, "ckpt": None, "tokenizer": None, "seed": 0, "seq_len": 0, "masks": False,
             "png": None, "text_pair": None, "gallery": None, "no_png": False}


def main(argv: list[str]) -> None:
    from minilm.config import parse_flags
    from minilm.errors import UserError
    from minilm.objectives import OBJECTIVES
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    # the sentence is the one argument that is neither a flag nor a flag's value
    sentences, rest, i = [], [], 0
    option_names = {f.name for cls in OBJECTIVES.values() for f in dataclasses.fields(cls.Options)}
    bare = {name for name, default in OWN_FLAGS.items() if isinstance(default, bool)}
    bare |= {f.name for cls in OBJECTIVES.values() for f in dataclasses.fields(cls.Options) if f.type in ("bool", bool)}
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            rest.append(arg)
            name = arg[2:].partition("=")[0].replace("-", "_")
            takes_value = "=" not in arg and (name not in bare or (i + 1 < len(argv) and argv[i + 1].lower() in
                                                                   ("true", "false", "1", "0", "yes", "no", "on", "off")))
            if takes_value and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
            elif name in bare and "=" not in arg:
                rest.append("true")          # `--masks` alone means --masks true
        else:
            sentences.append(arg)
        i += 1
    defaults = dict(OWN_FLAGS, **{name: None for name in option_names})
    flags = parse_flags(rest, defaults)
    given = {name: flags[name] for name in option_names if flags[name] is not None}
    if flags["gallery"]:
        write_gallery(flags["gallery"], pngs=not flags["no_png"])
        return
    if len(sentences) != 1:
        raise UserError(f"give one sentence (in quotes), got {len(sentences)} arguments besides flags (see --help)"
                        if sentences else 'give a sentence to explain, in quotes: --objective NAME "sentence" (see --help)')
    if flags["objective"] is not None and flags["objective"] in OBJECTIVES:
        cls = OBJECTIVES[flags["objective"]]
        own = {f.name for f in dataclasses.fields(cls.Options)}
        for name in given:
            if name not in own:
                raise UserError(f"--{name} is no option of {cls.name} (its options: "
                                f"{', '.join('--' + n for n in sorted(own)) or 'none'})")
    result = explain(flags["objective"], sentences[0], ckpt=flags["ckpt"], tokenizer=flags["tokenizer"],
                     seed=int(flags["seed"]), options=given or None, seq_len=int(flags["seq_len"]) or None,
                     text_pair=flags["text_pair"])
    print(result.render(masks=True if flags["masks"] else None))
    if flags["png"]:
        print(f"wrote {result.save_png(flags['png'])}")


class _CallableModule(type(sys)):
    """`minilm.explain(...)` is the function above even once this module is imported: importing a
    submodule makes it its package's attribute of the same name, here replacing the function that
    minilm/__init__.py defines, so the module itself answers the call."""

    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
