"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms"):
one encoder-decoder trained on several corruptions of the text at once, each example announcing
its kind with a mode token first in the encoder's input.

The idea: T5's span corruption with short spans (R, "regular") teaches understanding; long spans
or heavy corruption (X, "extreme") teach writing much from little; a prefix LM (S, "sequential")
teaches continuing a text. Each row draws one denoiser, its mode token tells the model which, and
at inference the user picks the mode that fits the task.

Numbers (UL2Options; the defaults are UL2R's mixture, Tay et al. 2022b, as levanter's ul2r):
  * R (mean span 3, density 0.15) -> [NLU]; X (32, 0.15) and X (3, 0.5) -> [NLG]; S -> [S2S]:
    --ul2_denoisers R:3:0.15,X:32:0.15,X:3:0.5,S:0.25 with --ul2_weights 1,1,1,3 (S half the
    rows, the others a sixth each). The paper's seven: R:3:0.15,R:8:0.15,X:3:0.5,X:8:0.5,
    X:64:0.15,X:64:0.5,S:0.25.
  * A span denoiser is t5's exactly (masking.noise_span_corruption): round(L r) noise tokens in
    max(1, round(noise / mu)) spans. Input: mode, the text with a sentinel per span, <eos>.
    Target: each sentinel then its span, then <eos>.
  * S:r (T5's prefix LM): the row's first L_S = seq_len - 1 tokens split at P uniform on
    max(1, round((1 - 2r)(L_S - 1)))..L_S-1, a quarter of the text to predict on average at UL2's
    r = 0.25 (r = 0.5: 1..L_S-1, as prefix_lm.py). Input: [S2S], prefix, <eos>; target: rest, <eos>.
  * The window L is the longest for which every span denoiser's input fits --seq_len: 567 for
    512, where R's input is exactly 512. Rows are right-padded: the encoder and cross-attention
    skip padded keys, the loss padded targets.

Shapes: raw (B, L) -> input_ids (B, S), S = seq_len, input_lengths (B,); decoder_input_ids and
labels (B, T), T = the longest target a denoiser makes (380 at seq_len 512), IGNORE past a row's
end; modes (B,) each row's denoiser (its index). Every denoiser corrupts every row and each row
keeps the one it drew: a few times the corruption's small cost, no host-device sync, fixed shapes.

Where we differ from UL2:
  * Mode tokens: the tokenizer's special ids are fixed and all taken, so the last three sentinels
    stand for them ([NLU] <extra_id_97>, [NLG] <extra_id_98>, [S2S] <extra_id_99>) and spans get
    the first 97: every existing tokenizer still works, and X (3, 0.5) fits --seq_len <= 528.
  * S reads seq_len - 1 tokens of the window, so its input fits the encoder and its target the
    decoder; UL2 packs whole documents per example. minilm's Block and positions, as t5.py.

Inference (encoder_input): infill with [NLU] (short gaps) or [NLG] (long ones), the text with a
sentinel per gap; continue a prompt with [S2S]; both then <eos>. The decoder starts from
DECODER_START_ID and writes sentinels and spans (R, X) or the continuation (S).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minilm import masking
from minilm.options import Options, option
from minilm.errors import UserError
from minilm.masking import SpanCorruptionError
from minilm.model import CAUSAL, padding_mask
from minilm.objectives.base import IGNORE, Objective
from minilm.objectives.t5 import DECODER_START_ID, SpanCorruption
from minilm.tokenizer import EOS_ID, PAD_ID, SENTINEL_IDS

# The mode tokens (the paper's names) are the last three sentinels; spans use the others.
MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}
MODE_IDS = {"R": SENTINEL_IDS[-3], "X": SENTINEL_IDS[-2], "S": SENTINEL_IDS[-1]}
SPAN_SENTINEL_IDS = SENTINEL_IDS[:-3]     # 97 sentinels: at most 97 noise spans per row


@dataclass
class UL2Options(Options):
    ul2_denoisers: str = option("R:3:0.15,X:32:0.15,X:3:0.5,S:0.25",
                                "ul2: the denoisers, comma-separated: MODE:MEAN_SPAN:DENSITY for span corruption "
                                "(MODE R or X, the mode token [NLU] or [NLG]), S:DENSITY for the prefix LM ([S2S]; "
                                "DENSITY the mean share of the text to predict, at most 0.5)")
    ul2_weights: str = option("1,1,1,3", "ul2: one weight per denoiser, the share of rows it corrupts (normalized); "
                                         "UL2R's: S half the rows, the others alike")

    def validate(self) -> None:
        super().validate()
        denoisers(self)


@dataclass(frozen=True)
class Denoiser:
    mode: str                  # "R", "X" (span corruption) or "S" (prefix LM)
    mean_span: float = 0.0     # mu, span denoisers only
    density: float = 0.0       # r: the share of noise tokens, or S's mean share of the text to predict

    def __str__(self) -> str:
        return f"S:{self.density:g}" if self.mode == "S" else f"{self.mode}:{self.mean_span:g}:{self.density:g}"


def denoisers(options: UL2Options) -> list[tuple[Denoiser, float]]:
    """The options' (denoiser, probability) pairs; a one-line UserError for a malformed list."""
    specs = [spec.strip() for spec in options.ul2_denoisers.split(",")]
    found = []
    for spec in specs:
        mode, *numbers = spec.split(":")
        try:
            if mode == "S" and len(numbers) <= 1:
                found.append(Denoiser("S", density=float(numbers[0]) if numbers else 0.25))
            elif mode in ("R", "X") and len(numbers) == 2:
                found.append(Denoiser(mode, float(numbers[0]), float(numbers[1])))
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"--ul2_denoisers: {spec!r} is neither MODE:MEAN_SPAN:DENSITY with MODE R or X "
                            f"(e.g. R:3:0.15) nor S:DENSITY (e.g. S:0.25)") from None
        if mode == "S" and not 0 < found[-1].density <= 0.5:
            raise UserError(f"--ul2_denoisers: {spec!r}: the S-denoiser's DENSITY, the mean share of the text to "
                            "predict, must be in (0, 0.5]")
    try:
        weights = [float(w) for w in options.ul2_weights.split(",")]
    except ValueError:
        raise UserError(f"--ul2_weights must be numbers separated by commas, got {options.ul2_weights!r}") from None
    if len(weights) != len(found):
        raise UserError(f"--ul2_weights has {len(weights)} weights for {len(found)} denoisers in --ul2_denoisers")
    if any(not 0 <= w < math.inf for w in weights) or not sum(weights) > 0:
        raise UserError(f"--ul2_weights must be finite, at least 0 and not all 0, got {options.ul2_weights!r}")
    return [(d, w / sum(weights)) for d, w in zip(found, weights)]


def prefix_range(length: int, density: float) -> tuple[int, int]:
    """(shortest, longest) prefix the S-denoiser draws, uniformly, for a text of `length` tokens:
    T5's random_prefix_noise_mask, max(1, round((1 - 2r)(L - 1))) to L - 1, so that the target is
    on average about r of the text; r = 0.5 gives T5's original 1..L-1 (prefix_lm.py's law)."""
    longest = length - 1
    return min(longest, max(1, round((1 - 2 * density) * longest))), longest


def ul2_lengths(seq_len: int, chosen: list[Denoiser]) -> tuple[int, int, int]:
    """(raw window L, S-denoiser's raw length L_S, target width T) for inputs of seq_len tokens.
    One-line SpanCorruptionError (a UserError) when a denoiser cannot work at this length."""
    def lengths(denoiser, call, length, sentinels):
        try:
            return call(length, denoiser.density, denoiser.mean_span, sentinels)
        except SpanCorruptionError as err:
            raise SpanCorruptionError(f"--objective ul2 with --seq_len {seq_len}, denoiser {denoiser}: {err}") from None

    spans = [d for d in chosen if d.mode != "S"]
    # the longest window whose every input fits, mode token aside (the sentinels are counted next)
    raw_length = min((lengths(d, masking.noise_span_window, seq_len - 1, seq_len)[0] for d in spans),
                     default=seq_len - 1)
    targets = [lengths(d, masking.noise_span_output_lengths, raw_length, len(SPAN_SENTINEL_IDS))[1] for d in spans]
    prefix_length = min(seq_len - 1, raw_length)
    for d in chosen:
        if d.mode == "S":
            if prefix_length < 2:
                raise SpanCorruptionError(f"--objective ul2 with --seq_len {seq_len}: the S-denoiser needs 2 raw "
                                          "tokens (a prefix and a target); use --seq_len 4 or more")
            targets.append(prefix_length - prefix_range(prefix_length, d.density)[0] + 1)   # shortest P, <eos>
    if max(targets) > seq_len:
        raise SpanCorruptionError(f"--objective ul2 with --seq_len {seq_len}: a denoiser makes targets of "
                                  f"{max(targets)} tokens, more than the decoder's {seq_len} positions; lower its "
                                  "density")
    return raw_length, prefix_length, max(targets)


class MixtureOfDenoisers(SpanCorruption):
    """t5's encoder-decoder, loss and metrics; UL2's batches (rows padded, modes first)."""
    name = "ul2"
    Options = UL2Options
    # infill (modes R, X) and generate (mode S: the prompt is the encoder's input, the decoder
    # writes the continuation), and embed (the encoder's hidden states), as t5
    capabilities = frozenset({"infill", "generate", "embed"})
    span_sentinel_ids = SPAN_SENTINEL_IDS   # the last three sentinels are the mode tokens

    def __init__(self, model_cfg, tokenizer=None, options=None):
        Objective.__init__(self)    # t5's constructor checks t5's options; these lengths are ours
        self.options = self.make_options(options)
        self.mixture = denoisers(self.options)
        self.raw_length, self.prefix_length, self.target_length = ul2_lengths(
            model_cfg.seq_len, [d for d, _ in self.mixture])
        self.backbone = self.build_backbone(model_cfg)
        self.keep_bytes_per_token(tokenizer, model_cfg.vocab_size)     # for bits per byte

    @classmethod
    def window_length(cls, model_cfg, options=None) -> int:
        return ul2_lengths(model_cfg.seq_len, [d for d, _ in denoisers(cls.make_options(options))])[0]

    # ------------------------------------------------------------------ the batch
    def make_batch(self, raw, generator=None):
        """raw (B, L) -> input_ids (B, S), input_lengths (B,), decoder_input_ids and labels
        (B, T), modes (B,) (the index of each row's denoiser in the mixture)."""
        if raw.shape[1] != self.raw_length:
            raise ValueError(f"ul2 reads windows of {self.raw_length} tokens (window_length), got {raw.shape[1]}")
        B, device = raw.shape[0], raw.device
        S, T = self.backbone.cfg.seq_len, self.target_length
        # each row draws its denoiser: u uniform in [0, 1) against the mixture's cumulative shares
        shares = torch.tensor([p for _, p in self.mixture], device=device, dtype=torch.float64)
        u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
        modes = torch.searchsorted(shares.cumsum(0), u, right=True).clamp(max=len(self.mixture) - 1)
        input_ids = raw.new_full((B, S), PAD_ID)
        input_lengths = torch.zeros(B, dtype=torch.long, device=device)
        labels = raw.new_full((B, T), IGNORE)
        for index, (denoiser, _) in enumerate(self.mixture):
            if denoiser.mode == "S":
                inputs, lengths, targets = self.prefix_lm(raw, generator, denoiser)
            else:
                inputs, lengths, targets = self.span_corruption(raw, generator, denoiser)
            chosen = (modes == index)[:, None]
            input_ids = torch.where(chosen, inputs, input_ids)
            input_lengths = torch.where(chosen[:, 0], lengths, input_lengths)
            labels = torch.where(chosen, targets, labels)
        # the decoder reads the labels shifted right, from <pad>; padded targets read <pad> too
        shifted = F.pad(labels[:, :-1], (1, 0), value=DECODER_START_ID)
        decoder_input_ids = shifted.masked_fill(shifted == IGNORE, PAD_ID)
        return {"input_ids": input_ids, "input_lengths": input_lengths, "decoder_input_ids": decoder_input_ids,
                "labels": labels, "modes": modes, "counts": {"targets": (labels != IGNORE).sum()}}

    def span_corruption(self, raw, generator, denoiser: Denoiser):
        """T5's span corruption of every row: (inputs (B, S), lengths (B,), targets (B, T)),
        inputs = mode, corrupted text, <eos>, then <pad>; targets padded with IGNORE."""
        inputs, targets, _ = masking.noise_span_corruption(raw, generator, denoiser.density, denoiser.mean_span,
                                                           SPAN_SENTINEL_IDS)
        B, length = inputs.shape
        S, T = self.backbone.cfg.seq_len, self.target_length
        inputs = F.pad(inputs, (1, S - 1 - length), value=PAD_ID)
        inputs[:, 0] = MODE_IDS[denoiser.mode]
        targets = F.pad(targets, (0, T - targets.shape[1]), value=IGNORE)
        return inputs, torch.full((B,), length + 1, device=raw.device), targets

    def prefix_lm(self, raw, generator, denoiser: Denoiser):
        """The S-denoiser on every row's first L_S tokens, split at P uniform on prefix_range:
        inputs [S2S] raw[:P] <eos> <pad>...; targets raw[P:L_S] <eos> IGNORE..."""
        B, L = raw.shape[0], self.prefix_length
        S, T = self.backbone.cfg.seq_len, self.target_length
        shortest, longest = prefix_range(L, denoiser.density)
        u = torch.rand((B, 1), generator=generator, device=raw.device, dtype=torch.float64)
        P = shortest + (u * (longest - shortest + 1)).floor().long()                           # (B, 1)
        position = torch.arange(S, device=raw.device)[None, :]                                  # input slot
        text = raw.gather(1, (position - 1).clamp(0, L - 1).expand(B, S))                       # slot s: raw[s-1]
        inputs = torch.where(position <= P, text, torch.where(position == P + 1, EOS_ID, PAD_ID))
        inputs[:, 0] = MODE_IDS["S"]
        step = torch.arange(T, device=raw.device)[None, :]                                      # target slot
        rest = raw.gather(1, (P + step).clamp(max=L - 1))                                       # slot t: raw[P+t]
        targets = torch.where(step < L - P, rest, torch.where(step == L - P, EOS_ID, IGNORE))
        return inputs, (P[:, 0] + 2), targets

    def attention_masks(self, batch):
        """(encoder self-attention, decoder self-attention, cross-attention) as forward hands them
        to the backbone: the rows are right-padded, so the encoder and the cross-attention skip the
        padded input keys (one padding mask (B, 1, 1, S) for both); the decoder is causal (its
        padded targets are dropped from the loss instead)."""
        input_mask = padding_mask(batch["input_lengths"], batch["input_ids"].shape[1])    # (B, 1, 1, S)
        return input_mask, CAUSAL, input_mask

    def forward(self, batch, totals=None):
        input_ids, labels = batch["input_ids"], batch["labels"]
        encoder_mask, decoder_mask, cross_mask = self.attention_masks(batch)
        encoder_output = self.backbone.encode(input_ids, encoder_mask)                 # (B, S, C)
        hidden = self.backbone.decode(batch["decoder_input_ids"], encoder_output, cross_mask,
                                      mask=decoder_mask)                               # (B, T, C)
        real = labels != IGNORE
        logits = self.backbone.logits(hidden[real])                                    # (N, V): real targets only
        return self.token_loss(logits, labels[real], batch, totals)

    def explain(self, batch, tokenizer):
        """t5's explanation (the sentinels, what each hides, the three masks, here with padding),
        plus the denoiser the row drew: a "denoiser" column (its mode token first, then the text
        it corrupted, then padding) and a note."""
        from minilm.explain import DASH
        explained = super().explain(batch, tokenizer)
        denoiser, share = self.mixture[int(batch["modes"][0])]
        length, S = int(batch["input_lengths"][0]), batch["input_ids"].shape[1]
        mode_token = tokenizer.id_to_piece(MODE_IDS[denoiser.mode])
        explained.columns["denoiser"] = [f"{denoiser} mode {MODE_TOKENS[denoiser.mode]}"] + \
            [DASH] * (length - 1) + ["padding"] * (S - length)
        if denoiser.mode == "S":
            what = (f"a prefix LM: the encoder reads the first {length - 2} tokens, the decoder writes the next "
                    f"{int((batch['labels'][0] != IGNORE).sum()) - 1} and {tokenizer.id_to_piece(EOS_ID)}")
        else:
            what = f"T5's span corruption, mean span {denoiser.mean_span:g}, noise density {denoiser.density:g}"
        explained.notes.insert(0, f"denoiser {denoiser} drawn (probability {share:.2g}): mode token "
                                  f"{MODE_TOKENS[denoiser.mode]} ({mode_token}) first, then {what}")
        if length < S:
            explained.notes.append(f"input padded from {length} to {S} tokens: the encoder and the cross-attention "
                                   "skip the padded keys")
        return explained

    # ------------------------------------------------------------------ inference
    # the mode a verb uses unless the user picks one: infill as R's short gaps, continue a prompt as S
    default_modes = {"infill": "R", "generate": "S"}

    @staticmethod
    def mode_of(mode: str) -> str:
        """"R", "X" or "S" from those letters or the mode tokens' names ("[NLU]", "nlu", ...)."""
        for letter, token in MODE_TOKENS.items():
            if mode.strip().upper() in (letter, token, token.strip("[]")):
                return letter
        raise UserError(f"unknown UL2 mode {mode!r}: R or [NLU] (fill short gaps), X or [NLG] (long gaps), "
                        "S or [S2S] (continue a prompt)")

    def encoder_input(self, ids: list[int], verb: str, mode: str = "") -> list[int]:
        """The encoder's input at inference, as in training: the mode token, ids, <eos>. `mode`
        ("R", "X", "S" or a mode token's name) defaults to default_modes[verb]. For infill, ids are
        the text with a sentinel per gap, <extra_id_0> first (at most 97 gaps: the last three
        sentinels are the mode tokens); for generate, the prompt's ids. The decoder then starts
        from DECODER_START_ID."""
        letter = self.mode_of(mode or self.default_modes[verb])
        if any(i in MODE_IDS.values() for i in ids):
            raise UserError(f"ul2 infills at most {len(SPAN_SENTINEL_IDS)} gaps (<extra_id_0> to "
                            f"<extra_id_{len(SPAN_SENTINEL_IDS) - 1}>): the last three sentinels are its mode tokens")
        return [MODE_IDS[letter], *ids, EOS_ID]
