"""`--objective ul2` (minilm/objectives/ul2.py): UL2's mixture of denoisers on t5's encoder-decoder.
Each denoiser's statistics (exact noise counts, span counts, span-length law by chi-square, the
S-denoiser's split law), the mode token matching the corruption, the mixture's frequencies, a
lossless round trip of every row, padding that changes nothing, the options and their errors,
the encoder input for inference, and a tiny model that learns.

Rows are decoded here from their definitions (the module docstring), in plain Python."""
from __future__ import annotations

import math

import pytest
import torch

from minilm.config import ModelConfig
from minilm.errors import UserError
from minilm.generate import generate_seq2seq
from minilm.objectives import build_objective, is_encoder_decoder, model_config_for, window_length_for
from minilm.objectives.base import IGNORE
from minilm.objectives.t5 import DECODER_START_ID
from minilm.objectives.ul2 import MODE_IDS, SPAN_SENTINEL_IDS, MixtureOfDenoisers, UL2Options
from minilm.tokenizer import EOS_ID, NUM_SPECIAL, PAD_ID, SENTINEL_IDS
from tests.test_t5 import tiny_run
from tests.test_t5_noise import chi_square, composition_part_pmf, expected_counts, reconstruct
from tests.test_trainer import accumulated_gradients, make_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

V = 512
DEFAULT = ("R:3:0.15", "X:32:0.15", "X:3:0.5", "S:0.25")


def ul2(seq_len=64, **options) -> MixtureOfDenoisers:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, seq_len=seq_len, n_layer=2, n_head=2, n_embd=32)
    return build_objective("ul2", cfg, None, UL2Options(**options))


def only(spec: str) -> dict:
    """Options that draw the one denoiser `spec` of the default mixture for every row (the window
    stays the default mixture's)."""
    return {"ul2_weights": ",".join("1" if d == spec else "0" for d in DEFAULT)}


def corrupt(objective, rows, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(NUM_SPECIAL, V, (rows, objective.raw_length), generator=g)
    return raw, objective.make_batch(raw, g)


def row_of(batch, row):
    """(mode id, encoder input without its mode token and padding, targets without IGNORE)."""
    length = int(batch["input_lengths"][row])
    inputs = batch["input_ids"][row].tolist()
    labels = batch["labels"][row].tolist()
    assert all(t == PAD_ID for t in inputs[length:]), "the input is right-padded with <pad>"
    targets = [t for t in labels if t != IGNORE]
    assert labels[:len(targets)] == targets, "the targets come first, then IGNORE"
    return inputs[0], inputs[1:length], targets


def chi2_critical(dof: int, z: float = 3.0902) -> float:
    """The chi-square quantile at p = 0.001 (z: the normal's), Wilson and Hilferty's approximation
    (within 1% for these degrees of freedom)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def frequency_chi_square(counts, probabilities):
    total = sum(counts)
    return sum((c - p * total) ** 2 / (p * total) for c, p in zip(counts, probabilities) if p > 0)


def noise_and_spans(targets):
    """From a span denoiser's targets: the span lengths, in order (sentinels and <eos> aside)."""
    assert targets[-1] == EOS_ID
    lengths = []
    for token in targets[:-1]:
        if token in SENTINEL_IDS:
            assert token == SPAN_SENTINEL_IDS[len(lengths)], "sentinels in order, the mode tokens never"
            lengths.append(0)
        else:
            lengths[-1] += 1
    return lengths


# ----------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("seq_len, raw_length, target_length", [(64, 69, 46), (512, 567, 380)])
def test_window_and_target_lengths(seq_len, raw_length, target_length):
    """seq_len 512: R's 567 raw tokens hold round(85.05) = 85 noise tokens in 28 spans, an input
    of 567 - 85 + 28 + 1 = 511 tokens and the mode token: exactly 512. The longest target is
    X (3, 0.5)'s: round(283.5) = 284 noise tokens (half to even), 95 sentinels, <eos>; S:0.25's
    511 tokens split at P >= round(0.5 x 510) = 255 leave at most 256 and <eos>. seq_len 64: X
    (3, 0.5) hides round(34.5) = 34 tokens in 11 spans: 46."""
    objective = ul2(seq_len)
    assert window_length_for("ul2", objective.backbone.cfg, UL2Options()) == raw_length == objective.raw_length
    assert objective.target_length == target_length and objective.prefix_length == seq_len - 1
    _, batch = corrupt(objective, 64, seed=0)
    assert batch["input_ids"].shape == (64, seq_len)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (64, target_length)
    assert int(batch["counts"]["targets"]) == int((batch["labels"] != IGNORE).sum())
    r_rows = batch["modes"] == 0
    assert r_rows.any() and (batch["input_lengths"][r_rows] == seq_len).all(), "R's input fills seq_len exactly"
    assert is_encoder_decoder("ul2")


# ----------------------------------------------------------------------------- each denoiser
@pytest.mark.parametrize("spec, bins", [
    ("R:3:0.15", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, None)]),
    ("X:32:0.15", [(1, 8), (9, 16), (17, 26), (27, 38), (39, 52), (53, None)]),
    ("X:3:0.5", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, None)]),
])
def test_span_denoiser_counts_and_span_lengths(spec, bins):
    """At seq_len 512 (L = 567): every row hides exactly round(L r) tokens in max(1, round(noise /
    mu)) spans (R: 85 in 28; X 32: 85 in 3; X 0.5: round(283.5) = 284, half to even, in 95),
    their mean span length is noise / spans, and the pooled span lengths follow the uniform
    composition law, as t5's (tests/test_t5_noise.py) — chi-square at p = 0.001."""
    mode, mean, density = spec.split(":")
    objective = ul2(512, **only(spec))
    raw, batch = corrupt(objective, 300, seed=1)
    noise, spans = expected_counts(567, float(density), float(mean))
    assert (noise, spans) == {"R:3:0.15": (85, 28), "X:32:0.15": (85, 3), "X:3:0.5": (284, 95)}[spec]
    pooled = []
    for row in range(len(raw)):
        mode_id, inputs, targets = row_of(batch, row)
        assert mode_id == MODE_IDS[mode]
        lengths = noise_and_spans(targets)
        assert len(lengths) == spans and sum(lengths) == noise and min(lengths) >= 1
        assert len(inputs) == 567 - noise + spans + 1
        pooled.append(lengths)
    lengths = torch.tensor(pooled)
    statistic, dof = chi_square(lengths, composition_part_pmf(noise, spans), bins)
    assert statistic < chi2_critical(dof), statistic


@pytest.mark.parametrize("spec, shortest", [("S:0.5", 1), ("S:0.25", 7), ("S", 7)])
def test_s_denoiser_splits_uniformly(spec, shortest):
    """S alone at seq_len 16: the first L_S = 15 raw tokens split at P uniform on
    max(1, round((1 - 2r) x 14))..14: 1..14 for r = 0.5 (T5's law), 7..14 for UL2's 0.25 (also
    what a bare S means). Input [S2S] prefix <eos>, target the rest and <eos>; chi-square of P."""
    objective = ul2(16, ul2_denoisers=spec, ul2_weights="1")
    raw, batch = corrupt(objective, 4200, seed=2)
    counts = [0] * 15
    for row in range(len(raw)):
        mode_id, inputs, targets = row_of(batch, row)
        assert mode_id == MODE_IDS["S"] and inputs[-1] == EOS_ID and targets[-1] == EOS_ID
        prefix = inputs[:-1]
        assert prefix + targets[:-1] == raw[row, :15].tolist()
        counts[len(prefix)] += 1
    assert counts[:shortest] == [0] * shortest and min(counts[shortest:]) > 0
    values = 15 - shortest
    assert frequency_chi_square(counts[shortest:], [1 / values] * values) < chi2_critical(values - 1)


# ----------------------------------------------------------------------------- the mixture
def classify(raw_length, inputs, targets):
    """Which denoiser made a row, from the row alone: S leaves no sentinel in the input; the span
    denoisers differ in their (noise, spans) counts at this window."""
    if not any(t in SENTINEL_IDS for t in inputs):
        return "S:0.25"
    lengths = noise_and_spans(targets)
    for spec in DEFAULT[:3]:
        _, mean, density = spec.split(":")
        if (sum(lengths), len(lengths)) == expected_counts(raw_length, float(density), float(mean)):
            return spec
    raise AssertionError(f"no denoiser makes {sum(lengths)} noise tokens in {len(lengths)} spans")


def test_the_mode_token_matches_the_corruption():
    """seq_len 128 (L = 140): R hides 21 tokens in 7 spans, X 32 21 in 1, X 0.5 70 in 23; S none."""
    objective = ul2(128)
    raw, batch = corrupt(objective, 400, seed=3)
    seen = set()
    for row in range(len(raw)):
        mode_id, inputs, targets = row_of(batch, row)
        spec = classify(140, inputs, targets)
        seen.add(spec)
        assert mode_id == MODE_IDS[spec[0]], (row, spec, mode_id)
        assert DEFAULT[int(batch["modes"][row])] == spec
    assert seen == set(DEFAULT)


@pytest.mark.parametrize("weights, shares", [("1,1,1,3", [1 / 6, 1 / 6, 1 / 6, 1 / 2]),
                                             ("2,0,1,1", [1 / 2, 0, 1 / 4, 1 / 4])])
def test_mixture_frequencies_follow_the_weights(weights, shares):
    """6000 rows at seq_len 32: the denoisers' counts against the normalized weights (chi-square
    at p = 0.001); a weight 0 is never drawn."""
    objective = ul2(32, ul2_weights=weights)
    _, batch = corrupt(objective, 6000, seed=4)
    counts = torch.bincount(batch["modes"], minlength=4).tolist()
    assert all(c == 0 for c, p in zip(counts, shares) if p == 0)
    used = sum(p > 0 for p in shares)
    assert frequency_chi_square(counts, shares) < chi2_critical(used - 1), counts
    # each row's mode token is its denoiser's
    mode_of_index = torch.tensor([MODE_IDS[spec[0]] for spec in DEFAULT])
    assert torch.equal(batch["input_ids"][:, 0], mode_of_index[batch["modes"]])


@pytest.mark.parametrize("seq_len", [16, 64, 512])
def test_every_row_round_trips(seq_len):
    """Input + targets give back the raw window (span denoisers) or its first L_S tokens (S)."""
    objective = ul2(seq_len)
    for seed in (5, 6):
        raw, batch = corrupt(objective, 128, seed)
        for row in range(len(raw)):
            mode_id, inputs, targets = row_of(batch, row)
            if mode_id == MODE_IDS["S"]:
                assert inputs[:-1] + targets[:-1] == raw[row, :seq_len - 1].tolist()
            else:
                assert reconstruct(inputs, targets) == raw[row].tolist()


def test_decoder_input_and_reproducibility():
    objective = ul2(64)
    _, batch = corrupt(objective, 32, seed=7)
    labels, decoder_ids = batch["labels"], batch["decoder_input_ids"]
    assert (decoder_ids[:, 0] == DECODER_START_ID).all()
    shifted = labels[:, :-1]
    assert torch.equal(decoder_ids[:, 1:], torch.where(shifted == IGNORE, PAD_ID, shifted))
    _, again = corrupt(objective, 32, seed=7)
    _, other = corrupt(objective, 32, seed=8)
    assert all(torch.equal(batch[k], again[k]) for k in ("input_ids", "labels", "modes", "input_lengths"))
    assert not torch.equal(batch["input_ids"], other["input_ids"])


def test_padding_changes_nothing():
    """What stands in the padded input slots and after a row's targets does not change the loss:
    the encoder and the cross-attention skip padded keys, the decoder is causal, the loss skips IGNORE."""
    objective = ul2(64).eval()
    _, batch = corrupt(objective, 16, seed=9)
    assert (batch["input_lengths"] < 64).any()
    g = torch.Generator().manual_seed(10)
    noisy = dict(batch)
    padded = torch.arange(64)[None, :] >= batch["input_lengths"][:, None]
    noisy["input_ids"] = torch.where(padded, torch.randint(NUM_SPECIAL, V, padded.shape, generator=g),
                                     batch["input_ids"])
    after = batch["labels"] == IGNORE
    after = after & torch.cat([torch.zeros_like(after[:, :1]), after[:, :-1]], dim=1)   # past the first IGNORE
    noisy["decoder_input_ids"] = torch.where(after, torch.randint(NUM_SPECIAL, V, after.shape, generator=g),
                                             batch["decoder_input_ids"])
    with torch.no_grad():
        loss, sums = objective(batch)
        noisy_loss, noisy_sums = objective(noisy)
    assert torch.allclose(loss, noisy_loss, atol=1e-5, rtol=0)
    assert int(sums["targets"]) == int(batch["counts"]["targets"])


class RowSeeded(MixtureOfDenoisers):
    """Corrupts each row with its own generator, seeded by the row's number (the raw row's first
    column), so a row gets the same denoiser and corruption whichever micro-batch it lands in."""

    def make_batch(self, raw, generator=None):
        rows = [super(RowSeeded, self).make_batch(r[None, 1:], torch.Generator().manual_seed(int(r[0]))) for r in raw]
        batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k != "counts"}
        return {**batch, "counts": {"targets": sum(r["counts"]["targets"] for r in rows)}}


def test_accumulation_equals_one_big_batch(tmp_path):
    """Micro-batches hold different numbers of targets (the denoisers' targets differ in length):
    the loss over the step's total targets still makes two micro-batches one batch."""
    def gradients(accum):
        cfg = make_config(tmp_path, V, objective="ul2", grad_accum=accum, batch_size=8 // accum)
        cfg.model = model_config_for("ul2", cfg.model)
        big = torch.cat([torch.arange(8)[:, None], torch.randint(NUM_SPECIAL, V, (8, window_length_for(
            "ul2", cfg.model)), generator=torch.Generator().manual_seed(4))], dim=1)
        return accumulated_gradients(cfg, lambda c: RowSeeded(c.model, None, UL2Options()), big, accum)

    loss1, g1 = gradients(1)
    loss2, g2 = gradients(2)
    assert torch.allclose(loss1, loss2, atol=1e-6)
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-7, rtol=1e-4), name


# ----------------------------------------------------------------------------- options and inference
@pytest.mark.parametrize("options, message", [
    ({"ul2_denoisers": "R:3", "ul2_weights": "1"}, "--ul2_denoisers: 'R:3' is neither"),
    ({"ul2_denoisers": "Q:3:0.15", "ul2_weights": "1"}, "neither MODE:MEAN_SPAN:DENSITY"),
    ({"ul2_weights": "1,1,1"}, "--ul2_weights has 3 weights for 4 denoisers"),
    ({"ul2_weights": "1,1,-1,1"}, "--ul2_weights must be finite, at least 0"),
    ({"ul2_weights": "0,0,0,0"}, "not all 0"),
    ({"ul2_weights": "1,inf,1,1"}, "must be finite"),
    ({"ul2_weights": "a,b,c,d"}, "--ul2_weights must be numbers"),
    ({"ul2_denoisers": "R:3:1.5", "ul2_weights": "1"}, "denoiser R:3:1.5: noise density must be between 0 and 1"),
    ({"ul2_denoisers": "S:0.7", "ul2_weights": "1"}, r"'S:0.7': the S-denoiser's DENSITY.* must be in \(0, 0.5\]"),
    ({"ul2_denoisers": "S:3:0.5", "ul2_weights": "1"}, "nor S:DENSITY"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        ul2(64, **options)


def test_too_long_for_the_97_span_sentinels():
    """X (3, 0.5) at seq_len 529 needs 98 spans; the last three sentinels are the mode tokens."""
    assert ul2(528).raw_length == window_length_for("ul2", model_config_for("ul2", ul2(528).backbone.cfg))
    with pytest.raises(UserError, match=r"seq_len 529, denoiser X:3:0.5: .* 98 noise spans but there are only 97"):
        window_length_for("ul2", ModelConfig(vocab_size=V, seq_len=529, n_layer=1, n_head=1, n_embd=8), UL2Options())


def test_encoder_input_for_inference():
    objective = ul2(64)
    assert len(set(MODE_IDS.values()) | set(SPAN_SENTINEL_IDS)) == len(SENTINEL_IDS) == 100
    text = [300, SENTINEL_IDS[0], 301]
    assert objective.encoder_input(text, "infill", "R") == [MODE_IDS["R"], *text, EOS_ID]
    assert objective.encoder_input(text, "infill", "[NLG]") == [MODE_IDS["X"], *text, EOS_ID]
    assert objective.encoder_input([300, 301], "generate", "s2s") == [MODE_IDS["S"], 300, 301, EOS_ID]
    assert [MODE_IDS[objective.mode_of(objective.default_modes[verb])] for verb in ("infill", "generate")] == \
        [MODE_IDS["R"], MODE_IDS["S"]]
    with pytest.raises(UserError, match="unknown UL2 mode 'Y'"):
        objective.encoder_input(text, "infill", "Y")
    with pytest.raises(UserError, match="at most 97 gaps"):
        objective.encoder_input([300, SENTINEL_IDS[98]], "infill", "R")
    # what the decoder then does: t5's generation, from DECODER_START_ID, on that input
    out = generate_seq2seq(objective.backbone, torch.tensor([objective.encoder_input(text, "infill", "R")]), 5,
                           start_id=DECODER_START_ID, eos_id=EOS_ID, temperature=0)
    assert out.shape == (1, 1, 5)


# ----------------------------------------------------------------------------- learning
def test_a_tiny_model_learns_the_mixture(tmp_path, prepared, tokenizer):
    """Start: about ln(V) nats over every target (spans, sentinels, continuations, <eos>). Sixty
    steps later, on held-out windows, far lower."""
    start, end = tiny_run("ul2", tmp_path, prepared, tokenizer, UL2Options())
    assert start["loss"] > math.log(tokenizer.vocab_size) - 0.3, start
    assert end["loss"] < start["loss"] - 1.2, (start, end)


# ----------------------------------------------------------------------------- inference through the API
def test_generate_and_infill_open_the_encoder_input_with_the_chosen_mode(tokenizer):
    """minilm's Model.generate on ul2 is t5's decoding of [mode] prompt <eos>: the same tokens as
    generate_seq2seq on encoder_input, S by default, another mode when asked; infill opens with R
    by default. A checkpoint without modes refuses one, and sample.py refuses --mode where no
    input opens with one."""
    from minilm.api import Model
    from minilm.config import Config
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=32)
    objective = build_objective("ul2", cfg, tokenizer, UL2Options()).eval()
    model = Model(objective, tokenizer, Config(), "ul2-checkpoint", "cpu")
    prompt = "The cat sat"
    prompt_ids = tokenizer.encode(prompt)

    def greedy(input_ids):
        out = generate_seq2seq(objective.backbone, torch.tensor([input_ids]), 8, start_id=DECODER_START_ID,
                               eos_id=EOS_ID, temperature=0)[0, 0].tolist()
        return out[:out.index(EOS_ID)] if EOS_ID in out else out

    for mode, token in (("", "S"), ("X", "X"), ("[NLU]", "R")):
        expected = tokenizer.decode(prompt_ids + greedy([MODE_IDS[token], *prompt_ids, EOS_ID]))
        assert model.generate(prompt, max_new_tokens=8, temperature=0, mode=mode) == [expected]
    assert model.generate(prompt, max_new_tokens=0, temperature=0) == [prompt]
    # infill: the default mode is R's [NLU]
    text = "The cat <extra_id_0> on the mat."
    fillings = {mode: model.infill(text, max_new_tokens=8, temperature=0, mode=mode)[0] for mode in ("", "R", "X")}
    assert fillings[""] == fillings["R"]
    with pytest.raises(UserError, match="unknown UL2 mode"):
        model.infill(text, mode="Q")
    with pytest.raises(UserError, match="mode must be a string"):
        model.generate(prompt, mode=3)
    # t5 frames its input without a mode token and refuses one
    t5 = build_objective("t5", cfg, tokenizer).eval()
    assert t5.encoder_input([300, 301], "infill") == [300, 301, EOS_ID]
    with pytest.raises(UserError, match="t5 has no modes"):
        Model(t5, tokenizer, Config(), "t5-checkpoint", "cpu").infill(text, mode="R")
    import sample
    with pytest.raises(UserError, match="--mode picks the mode token"):
        sample.main(["--ckpt", "nowhere", "--mode", "R", "--fill", "a <mask>"])
