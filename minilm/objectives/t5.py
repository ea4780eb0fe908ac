"""T5 span corruption (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", sections 3.1.4 and 3.3).

Hide random spans of a window, replace each span by one sentinel token in the encoder's input, and
train a decoder to write the hidden spans out, each after its sentinel. The encoder reads the
corrupted text both ways; the decoder writes causally and cross-attends to the encoder in every
block, so only the short target is generated.

Numbers (T5's defaults):
  * --noise_density 0.15 of each raw window's L tokens are noise: round(0.15 L) clamped to
    1..L-1, in max(1, round(noise / --mean_noise_span_length 3)) spans;
  * span lengths follow T5's random_segmentation: the noise and the non-noise tokens are each
    split into that many non-empty parts uniformly over all compositions (not a geometric or
    Poisson law), interleaved so every window starts with non-noise and ends with noise
    (minilm/masking.py, noise_span_mask);
  * sentinels in fixed order (tokenizer.SENTINEL_IDS): the first span of every row is
    <extra_id_0>, the next <extra_id_1>, ... Input: the non-noise tokens, one sentinel per span,
    <eos>. Target: each sentinel followed by the tokens it hides, then <eos>;
  * --seq_len is the encoder's input length; the raw window is the longest whose input comes out
    at exactly seq_len tokens: 568 raw tokens give a 512-token input and a 114-token target, 70
    give 64 and 14, with no padding anywhere. The target must fit the decoder's positions
    (target length <= seq_len), which densities up to about 0.5 do;
  * the decoder reads the target shifted right after DECODER_START_ID = PAD_ID (<pad>, as T5);
  * the loss is the cross-entropy over every target token (sentinels and <eos> included), summed
    and divided by the step's target count (base.py).

Shapes: raw (B, L) from the "blocks" source (L = window_length, 568 for seq_len 512) -> input_ids
(B, S), S = seq_len; decoder_input_ids and labels (B, T), T = target length (114); encoder output
(B, S, C) -> decoder hidden (B, T, C) -> logits (B, T, V).

The backbone is minilm's EncoderDecoder: n_layer encoder blocks and n_decoder_layer decoder blocks
(0 means as many as the encoder; `configure` writes the real number into the saved config), one
shared token embedding, tied output. Metrics: the shared sums; bytes are those of the hidden text
(specials count 0), so bits per byte are those of recovering the hidden spans, comparable between
t5 runs.

Where we differ from T5: minilm's pre-norm Block with rotary (or learned) positions in each stack
instead of T5's relative position buckets, and minilm's MLP (GELU by default; --mlp swiglu is close
to T5.1.1's gated GELU).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minilm import masking
from minilm.flops import encoder_decoder_flops
from minilm.masking import SpanCorruptionError
from minilm.model import CAUSAL, EncoderDecoder
from minilm.objectives.base import IGNORE, Baseline, Objective, check_model_config
from minilm.options import Options, option
from minilm.tokenizer import EOS_ID, PAD_ID, SENTINEL_IDS

# The decoder's first input token: <pad>, as in T5 (decoder_start_token_id = pad_token_id).
# minilm/generate.py takes it as an argument; minilm/api.py reads it as the objective's decoder_start_id.
DECODER_START_ID = PAD_ID


@dataclass
class SpanCorruptionOptions(Options):
    noise_density: float = option(0.15, "t5: share of each window's tokens hidden in noise spans (each span "
                                        "becomes one sentinel in the input)", within="(0, 1)")
    mean_noise_span_length: float = option(3.0, "t5: mean length of a noise span, in tokens; spans = "
                                                "round(noise tokens / this)", at_least=1)


def span_corruption_lengths(model_cfg, options) -> tuple[int, int]:
    """(raw window length, target length) for an input of model_cfg.seq_len tokens under the
    options' noise density and mean span length. One-line SpanCorruptionError (a UserError) when
    no window works or the target would not fit the decoder's seq_len positions."""
    options.validate()
    seq_len = model_cfg.seq_len
    try:
        raw_length, target_length = masking.noise_span_window(seq_len, options.noise_density,
                                                              options.mean_noise_span_length, len(SENTINEL_IDS))
    except SpanCorruptionError as err:
        raise SpanCorruptionError(f"--objective t5 with --seq_len {seq_len}: T5 {err}") from None
    if target_length > seq_len:
        raise SpanCorruptionError(
            f"--objective t5 with --seq_len {seq_len} and --noise_density {options.noise_density} makes targets of "
            f"{target_length} tokens, more than the decoder's {seq_len} positions; lower --noise_density")
    return raw_length, target_length


class SpanCorruption(Objective):
    name = "t5"
    data = "blocks"
    model_kind = "seq2seq"
    Options = SpanCorruptionOptions
    capabilities = frozenset({"infill", "embed"})   # embed: the encoder's hidden states
    decoder_start_id = DECODER_START_ID              # what infill's decoding starts from
    span_sentinel_ids = SENTINEL_IDS                 # the sentinels a noise span may become
    baseline = Baseline("each decoder target predicted by its unigram frequency", targets="labels", margin=0.05)
    # A classifier on this encoder (classify.py) fine-tunes at 3e-3 where --lr is not given, not at
    # classify's 1e-3 for pretrained backbones: on the man-page task (benchmarks/README.md, issue 23)
    # its classifier gains 5 points on each of 3 seeds at 3e-3, where a masked LM's loses 3 and at
    # 1e-2 this one loses too. Its features lean on one prose-or-code direction, and a bigger step
    # moves them off it in a few hundred steps. ul2 inherits it, unmeasured at other values.
    finetune_lr = 3e-3

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = options = self.make_options(options)
        self.raw_length, self.target_length = span_corruption_lengths(model_cfg, options)
        self.backbone = self.build_backbone(model_cfg)
        self.keep_bytes_per_token(tokenizer, model_cfg.vocab_size)     # for bits per byte

    @classmethod
    def configure(cls, model_cfg, options):
        # a decoder as deep as the encoder unless --n_decoder_layer says otherwise
        if model_cfg.n_decoder_layer == 0:
            return dataclasses.replace(model_cfg, n_decoder_layer=model_cfg.n_layer)
        return model_cfg

    @classmethod
    def window_length(cls, model_cfg, options=None) -> int:
        return span_corruption_lengths(model_cfg, cls.make_options(options))[0]

    def build_backbone(self, model_cfg) -> EncoderDecoder:
        check_model_config([type(self)], model_cfg, self.options)
        return EncoderDecoder(model_cfg)

    def make_batch(self, raw, generator=None):
        """raw (B, L) with L = window_length -> input_ids (B, S), decoder_input_ids and labels (B, T)."""
        if raw.shape[1] != self.raw_length:
            raise ValueError(f"t5 reads windows of {self.raw_length} tokens (window_length), got {raw.shape[1]}")
        input_ids, labels, _ = masking.noise_span_corruption(raw, generator, self.options.noise_density,
                                                             self.options.mean_noise_span_length, SENTINEL_IDS)
        decoder_input_ids = F.pad(labels[:, :-1], (1, 0), value=DECODER_START_ID)    # shifted right
        return {"input_ids": input_ids, "decoder_input_ids": decoder_input_ids, "labels": labels,
                "counts": {"targets": torch.tensor(labels.numel(), device=labels.device)}}

    def attention_masks(self, batch):
        """The masks forward hands the backbone: (encoder self-attention, decoder self-attention,
        cross-attention), each as attention() takes it. t5's rows are never padded: None (every
        query sees every key) in the encoder and across, CAUSAL in the decoder."""
        return None, CAUSAL, None

    def forward(self, batch, totals=None):
        encoder_mask, decoder_mask, cross_mask = self.attention_masks(batch)
        encoder_output = self.backbone.encode(batch["input_ids"], encoder_mask)  # (B, S, C)
        hidden = self.backbone.decode(batch["decoder_input_ids"], encoder_output, cross_mask,
                                      mask=decoder_mask)                          # (B, T, C)
        logits = self.backbone.logits(hidden)                                    # (B, T, V)
        return self.token_loss(logits.flatten(0, 1), batch["labels"].flatten(), batch, totals)

    @torch.no_grad()
    def predictions(self, batch):
        """The token the decoder finds likeliest at each decoder position of row 0, reading the true
        target before it (teacher forcing, as in training): (T,)."""
        row = {key: value[:1] for key, value in batch.items() if torch.is_tensor(value) and value.dim() >= 1}
        encoder_mask, decoder_mask, cross_mask = self.attention_masks(row)
        encoder_output = self.backbone.encode(row["input_ids"], encoder_mask)
        hidden = self.backbone.decode(row["decoder_input_ids"], encoder_output, cross_mask, mask=decoder_mask)
        return self.backbone.logits(hidden)[0].argmax(-1)

    def explain(self, batch, tokenizer):
        """One row of the batch: the encoder's input (a sentinel in place of each noise span;
        "hides": what each sentinel stands for), the decoder's input and target ("hidden in": the
        sentinel whose span a target token was hidden in), and the three masks forward hands the
        backbone. The spans are read off the target, which lists each sentinel then its tokens."""
        from minilm.explain import DASH, Explained, mask_grid, pieces, targets
        input_ids, labels = batch["input_ids"][0], batch["labels"][0]
        reads, decoder_reads = pieces(tokenizer, input_ids), pieces(tokenizer, batch["decoder_input_ids"][0])
        written = int((labels != IGNORE).sum())     # the target's real tokens; the last is <eos>
        hidden_in = [DASH] * len(labels)            # per decoder position: the sentinel its token was hidden in
        spans: dict[int, list[str]] = {}            # sentinel id -> the pieces of its span
        sentinel = None
        for t, token in enumerate(labels[:written - 1].tolist()):
            if token in self.span_sentinel_ids:
                sentinel, spans[token] = token, []
            elif sentinel is not None:
                spans[sentinel].append(tokenizer.id_to_piece(token))
                hidden_in[t] = tokenizer.id_to_piece(sentinel)
        hides = [" ".join(spans[token]) if token in spans else DASH for token in input_ids.tolist()]
        S, T = len(reads), len(decoder_reads)
        encoder_mask, decoder_mask, cross_mask = self.attention_masks(batch)
        notes = []
        if spans:
            names = [tokenizer.id_to_piece(token) for token in spans]        # in the order they came
            read = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}, in order,"
            hide = "spans hide" if len(names) > 1 else "span hides"
            notes.append(f"{len(names)} noise {hide} {sum(map(len, spans.values()))} tokens: the encoder reads {read} "
                         f"in their place; the decoder writes each sentinel, then its span, then "
                         f"{tokenizer.id_to_piece(EOS_ID)}")
        start = tokenizer.id_to_piece(self.decoder_start_id)
        notes.append(f"the decoder reads its target shifted right, from {start}: it sees the target tokens before "
                     "the one it predicts, and the whole encoder input")
        return Explained(
            columns={"reads": reads, "target": [DASH] * S, "hides": hides},
            decoder={"reads": decoder_reads, "target": targets(tokenizer, labels, IGNORE), "hidden in": hidden_in},
            masks={"encoder self-attention": (reads, reads, mask_grid(encoder_mask, S, S)),
                   "decoder causal self-attention": (decoder_reads, decoder_reads, mask_grid(decoder_mask, T, T)),
                   "cross-attention": (decoder_reads, reads, mask_grid(cross_mask, T, S))},
            notes=notes)

    def flops_per_token(self) -> float:
        """Training FLOPs per encoder input token (what the trainer's tokens/s counts): one
        example's encoder over S = seq_len tokens, decoder over T target tokens with the LM head,
        cross-attention keys/values once over S (flops.encoder_decoder_flops), divided by S."""
        return encoder_decoder_flops(self.backbone, self.backbone.cfg.seq_len, self.target_length) / self.backbone.cfg.seq_len
