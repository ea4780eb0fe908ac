"""minilm/generate.py for encoder-decoders and prefix LMs: the KV cache changes no token, beam
search with one beam is greedy, beam search finds the best-scoring sequence on a hand-built toy
(checked by enumerating every sequence) where greedy does not, the length penalty pushes the
documented way, eos ends rows, padded batches decode like their rows alone, the encoder runs once
per decode, and a prefix LM's prompt attends both ways."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from minilm.config import ModelConfig
from minilm.errors import UserError
from minilm.generate import (beam_loop, beam_search, generate, generate_seq2seq, sample_loop,
                             seq2seq_step)
from minilm.model import EncoderDecoder, KVCache, Transformer, prefix_mask
from minilm.tokenizer import EOS_ID, MASK_ID, SENTINEL_IDS
from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

VOCAB, SEQ_LEN = 40, 24
START, EOS = 0, 3
NEVER = -1  # an eos id no token has: rows run to max_new_tokens


def large_random_weights(model, seed: int):
    """Weights at 3/sqrt(fan_in): at the 0.02 init every position predicts nearly the same token,
    and a comparison of two decodes would compare one repeated token (tests/test_generate.py)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(3 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model.eval()


def make_seq2seq(seed: int = 0) -> EncoderDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, n_layer=2, n_decoder_layer=2, n_head=2, n_embd=32)
    return large_random_weights(EncoderDecoder(cfg), seed)


def inputs(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- cache == no cache
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.9, 10, 0.9)])
def test_cached_decoding_equals_uncached_token_for_token(temperature, top_k, top_p):
    model = make_seq2seq()
    x = inputs()
    outs = []
    for use_cache in (True, False):
        outs.append(generate_seq2seq(model, x, 16, start_id=START, eos_id=NEVER, num_samples=2,
                                     temperature=temperature, top_k=top_k, top_p=top_p,
                                     generator=torch.Generator().manual_seed(5), use_cache=use_cache))
    assert outs[0].shape == (3, 2, 16)
    assert len(torch.unique(outs[0])) > 5  # not one repeated token
    assert torch.equal(outs[0], outs[1])


def test_step_logits_with_cache_match_recomputation():
    model = make_seq2seq()
    x = inputs()
    tokens = torch.cat([torch.full((3, 1), START), generate_seq2seq(
        model, x, 12, start_id=START, eos_id=NEVER, temperature=0.0)[:, 0]], dim=1)
    memory = model.encode(x)
    cache = KVCache(model.decoder.cfg, 3, x.device, memory.dtype)
    with torch.no_grad():
        for t in range(1, tokens.shape[1]):
            cached = seq2seq_step(model, tokens[:, :t], memory, None, cache)
            recomputed = seq2seq_step(model, tokens[:, :t], memory, None, None)
            torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=1e-4)  # logits ~10
            # and greedy took each token from exactly these logits
            assert torch.equal(recomputed.argmax(-1), tokens[:, t])
    assert cache.length == tokens.shape[1] - 1


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_cached_equals_uncached(early_stopping):
    model = make_seq2seq(1)
    x = inputs(seed=1)
    eos = int(generate_seq2seq(model, x, 8, start_id=START, eos_id=NEVER, temperature=0.0)[0, 0, 5])
    runs = [beam_search(model, x, 12, start_id=START, eos_id=eos, beam_size=4, early_stopping=early_stopping,
                        use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0])
    torch.testing.assert_close(runs[0][1], runs[1][1])
    assert torch.isfinite(runs[0][1]).all()


# ----------------------------------------------------------------------------- beam 1 == greedy
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_size_one_equals_greedy(length_penalty):
    model = make_seq2seq(2)
    x = inputs(4, seed=2)
    raw = generate_seq2seq(model, x, 14, start_id=START, eos_id=NEVER, temperature=0.0)[:, 0]
    eos = int(raw[0, 6])  # some rows meet it, some perhaps not: both ends of the loop are used
    greedy = generate_seq2seq(model, x, 14, start_id=START, eos_id=eos, temperature=0.0)[:, 0]
    beams, scores = beam_search(model, x, 14, start_id=START, eos_id=eos, beam_size=1,
                                length_penalty=length_penalty)
    assert torch.equal(beams[:, 0], greedy)
    # its score is the greedy sequence's: sum of log-probabilities / length ** length_penalty
    logits = model.logits(model.decode(torch.cat([torch.full((4, 1), START), greedy[:, :-1]], 1), model.encode(x)))
    token_logp = logits.log_softmax(-1).gather(2, greedy[:, :, None])[:, :, 0]
    ended = (greedy == eos).cumsum(1)
    counted = (ended == 0) | ((ended == 1) & (greedy == eos))  # up to and including the first eos
    lengths = counted.sum(1)
    want = (token_logp * counted).sum(1) / lengths.float() ** length_penalty
    torch.testing.assert_close(scores[:, 0], want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- a hand-built toy
# Token 0 is the start token (and an ordinary token after it), 1 is eos, 2 and 3 are words "A"
# and "B". Each table gives the next-token probabilities after a prefix of generated tokens;
# any prefix not listed gets DEFAULT.
TOY_EOS = 1
DEFAULT = [0.3, 0.3, 0.2, 0.2]
# Greedy takes A (0.5), after which every token is unlikely; B (0.4) then eos (0.9) is the best
# sequence under any length penalty in [0, 2].
TRAP = {(): [0.0, 0.1, 0.5, 0.4], (2,): [0.26, 0.25, 0.25, 0.24], (3,): [0.04, 0.9, 0.03, 0.03]}
# eos at once (0.45) against A A eos (0.5 * 0.9 * 0.9 = 0.405): the plain sum prefers the short
# one, the per-token mean the long one.
SHORT_OR_LONG = {(): [0.0, 0.45, 0.5, 0.05], (2,): [0.03, 0.05, 0.9, 0.02], (2, 2): [0.05, 0.9, 0.03, 0.02]}


def toy_step(table):
    """A step function (tokens (N, t) -> (N, V) logits) from a table of probabilities."""
    def step(tokens):
        rows = [table.get(tuple(row[1:]), DEFAULT) for row in tokens.tolist()]
        return torch.tensor(rows).clamp_min(1e-30).log()
    return step


def brute_force_best(table, max_len: int, length_penalty: float):
    """Every sequence the decoder can output (ending at its first eos, or unfinished at max_len),
    scored as beam search documents; returns them sorted best first as (score, tokens)."""
    scored = []
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(4), repeat=length):
            if TOY_EOS in seq[:-1] or (length < max_len and seq[-1] != TOY_EOS):
                continue
            logp = sum(math.log(max(table.get(seq[:i], DEFAULT)[tok], 1e-30)) for i, tok in enumerate(seq))
            scored.append((logp / length ** length_penalty, list(seq)))
    return sorted(scored, key=lambda s: -s[0])


def toy_beam(table, beam_size, max_len, length_penalty, early_stopping=False):
    tokens, scores = beam_loop(toy_step(table), lambda index: None, 1, beam_size, max_len, start_id=0,
                               eos_id=TOY_EOS, pad_id=TOY_EOS, length_penalty=length_penalty,
                               early_stopping=early_stopping)
    best = tokens[0, 0].tolist()
    return best[:best.index(TOY_EOS) + 1] if TOY_EOS in best else best, scores[0, 0].item()


def toy_greedy(table, max_len):
    out = sample_loop(toy_step(table), 1, max_len, start_id=0, eos_id=TOY_EOS, pad_id=TOY_EOS, temperature=0.0)
    row = out[0].tolist()
    return row[:row.index(TOY_EOS) + 1] if TOY_EOS in row else row


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_finds_the_best_sequence_where_greedy_does_not(length_penalty, early_stopping):
    (best_score, best), (second_score, _) = brute_force_best(TRAP, 4, length_penalty)[:2]
    assert best == [3, TOY_EOS] and best_score > second_score + 0.01
    got, score = toy_beam(TRAP, 2, 4, length_penalty, early_stopping)
    assert got == best
    assert score == pytest.approx(best_score, abs=1e-5)
    assert toy_greedy(TRAP, 4)[0] == 2  # greedy walks into the trap


def test_length_penalty_favours_longer_sequences_as_it_grows():
    short, long = [TOY_EOS], [2, 2, TOY_EOS]
    for length_penalty, want in ((0.0, short), (0.5, long), (1.0, long), (2.0, long)):
        assert brute_force_best(SHORT_OR_LONG, 4, length_penalty)[0][1] == want
        assert toy_beam(SHORT_OR_LONG, 2, 4, length_penalty)[0] == want, length_penalty


# eos at once (0.5) is finished first; A eos (0.45 * 0.3) one step later fills the two beams'
# hypotheses; A A eos (0.45 * 0.7 * 0.95) comes a step after that and has the best mean.
LATE_BEST = {(): [0.0, 0.5, 0.45, 0.05], (2,): [0.0, 0.3, 0.7, 0.0], (3,): [0.04, 0.9, 0.03, 0.03],
             (2, 2): [0.02, 0.95, 0.02, 0.01]}


def test_early_stopping_stops_at_beam_size_hypotheses_and_false_searches_on():
    best = brute_force_best(LATE_BEST, 4, 1.0)[0][1]
    assert best == [2, 2, TOY_EOS]
    # True: done once 2 hypotheses are finished (eos, A eos), before A A eos is reached
    assert toy_beam(LATE_BEST, 2, 4, 1.0, early_stopping=True)[0] == [TOY_EOS]
    # False: a running beam (A A, log-prob sum log 0.315) could still reach -1.155 / 4 > the worst
    # kept score log(0.135) / 2, so the search goes on and finds the best
    assert toy_beam(LATE_BEST, 2, 4, 1.0, early_stopping=False)[0] == best


# ----------------------------------------------------------------------------- eos
def test_eos_ends_each_row_and_the_rest_is_padding():
    model = make_seq2seq(3)
    x = inputs(4, seed=3)
    raw = generate_seq2seq(model, x, 16, start_id=START, eos_id=NEVER, temperature=0.0)[:, 0]
    eos = int(raw[0, 4])
    out = generate_seq2seq(model, x, 16, start_id=START, eos_id=eos, pad_id=1, temperature=0.0)[:, 0]
    n_ended = 0
    for got, free in zip(out.tolist(), raw.tolist()):
        if eos in free:  # the same tokens up to the first eos, then pad_id to the end
            end = free.index(eos) + 1
            assert got == free[:end] + [1] * (16 - end)
            n_ended += 1
        else:
            assert got == free
    assert n_ended >= 1
    # beam search: every kept hypothesis ends at its eos, then pad
    tokens, scores = beam_search(model, x, 16, start_id=START, eos_id=eos, pad_id=1, beam_size=3)
    for hyp in tokens.view(-1, 16).tolist():
        if eos in hyp:
            assert set(hyp[hyp.index(eos) + 1:]) <= {1}


# ----------------------------------------------------------------------------- padding, encoder calls
def test_a_padded_batch_decodes_like_each_input_alone():
    model = make_seq2seq(4)
    lengths = torch.tensor([9, 4, 6])
    x = inputs(3, 9, seed=4)  # the "padding" is random tokens: only the mask can hide them
    eos = int(generate_seq2seq(model, x[:1], 8, start_id=START, eos_id=NEVER, temperature=0.0)[0, 0, 5])
    greedy = generate_seq2seq(model, x, 12, start_id=START, eos_id=eos, input_lengths=lengths, temperature=0.0)
    beams, scores = beam_search(model, x, 12, start_id=START, eos_id=eos, input_lengths=lengths, beam_size=3)
    for i, n in enumerate(lengths.tolist()):
        alone = x[i:i + 1, :n]
        assert torch.equal(greedy[i], generate_seq2seq(model, alone, 12, start_id=START, eos_id=eos,
                                                       temperature=0.0)[0])
        beams_alone, scores_alone = beam_search(model, alone, 12, start_id=START, eos_id=eos, beam_size=3)
        assert torch.equal(beams[i], beams_alone[0])
        torch.testing.assert_close(scores[i], scores_alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_encoder_runs_once_per_decode(use_cache):
    model = make_seq2seq()
    calls = []
    model.encoder.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    x = inputs(2)
    generate_seq2seq(model, x, 8, start_id=START, eos_id=NEVER, temperature=0.0, use_cache=use_cache)
    generate_seq2seq(model, x, 8, start_id=START, eos_id=NEVER, num_samples=3, generator=torch.Generator(),
                     use_cache=use_cache)
    beam_search(model, x, 8, start_id=START, eos_id=NEVER, beam_size=4, use_cache=use_cache)
    assert calls == [2, 2, 2]  # once each, over the 2 examples, not their samples or beams


def test_more_new_tokens_than_the_decoder_window_is_a_user_error():
    model = make_seq2seq()
    with pytest.raises(UserError, match=r"max_new_tokens 25 is more than the decoder's context window \(24\)"):
        generate_seq2seq(model, inputs(), 25, start_id=START, eos_id=EOS)
    with pytest.raises(UserError, match="max_new_tokens 25"):
        beam_search(model, inputs(), 25, start_id=START, eos_id=EOS)
    assert generate_seq2seq(model, inputs(), 24, start_id=START, eos_id=NEVER, temperature=0.0).shape == (3, 1, 24)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -5.0, 5.0])
def test_zero_new_tokens_gives_the_empty_hypothesis_scored_zero(length_penalty):
    """max_new_tokens 0: one hypothesis, the empty one (sum of no log-probabilities: 0), not a
    0 / 0 = nan; the other beams found nothing and score -inf."""
    tokens, scores = beam_search(make_seq2seq(), inputs(), 0, start_id=START, eos_id=EOS, beam_size=3,
                                 length_penalty=length_penalty)
    assert tokens.shape == (3, 3, 0)
    assert scores[:, 0].tolist() == [0.0, 0.0, 0.0] and torch.isneginf(scores[:, 1:]).all()


@pytest.mark.parametrize("length_penalty", [1100, -6, 5.5, float("inf"), float("nan"), "1"])
def test_a_length_penalty_outside_its_range_is_a_user_error(length_penalty):
    """length ** 1100 overflowed (OverflowError); a penalty outside [-5, 5] is refused in one line."""
    with pytest.raises(UserError, match=r"^length_penalty must be (a finite number |a number )?in \[-5, 5\], got"):
        beam_search(make_seq2seq(), inputs(), 4, start_id=START, eos_id=EOS, beam_size=2,
                    length_penalty=length_penalty)


@pytest.mark.parametrize("decode", ["greedy", "sample", "beam"])
def test_nan_weights_are_a_one_line_error_in_every_decode(decode):
    """Greedy and beam search on NaN logits returned garbage; sampling failed in multinomial."""
    model = make_seq2seq()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(UserError, match=r"^the model produced NaN or infinite logits: its weights are damaged"):
        if decode == "beam":
            beam_search(model, inputs(), 4, start_id=START, eos_id=EOS, beam_size=2)
        else:
            generate_seq2seq(model, inputs(), 4, start_id=START, eos_id=EOS,
                             temperature=0.0 if decode == "greedy" else 1.0)


# ----------------------------------------------------------------------------- prefix LM
def make_decoder(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return large_random_weights(Transformer(ModelConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, n_layer=2, n_head=2,
                                                        n_embd=32)), seed)


def test_prefix_lm_mask():
    want = torch.tensor([[1, 1, 1, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(prefix_mask(torch.tensor([3]), 5)[0, 0], want)
    assert torch.equal(prefix_mask(torch.tensor([0]), 4)[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


@torch.no_grad()
def reference_prefix_greedy(model, prompt, n):
    """Greedy prefix-LM decoding written out: a full pass per token, with the mask spelled out
    element by element (prompt keys visible to all, the rest causal)."""
    tokens = prompt
    P = prompt.shape[1]
    for _ in range(n):
        T = tokens.shape[1]
        mask = torch.tensor([[j < P or j <= i for j in range(T)] for i in range(T)])
        logits = model.logits(model(tokens, mask=mask)[:, -1])
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("new", [10, 18])  # within the window; past it (sliding, no cache)
def test_prefix_lm_generation_cached_equals_uncached_and_the_prompt_sees_both_ways(new):
    model = make_decoder()
    prompt = torch.randint(4, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    cached = generate(model, prompt, new, temperature=0.0, prompt_is_prefix=True)
    uncached = generate(model, prompt, new, temperature=0.0, prompt_is_prefix=True, use_cache=False)
    assert torch.equal(cached, uncached)
    if prompt.shape[1] + new <= SEQ_LEN:
        assert torch.equal(cached, reference_prefix_greedy(model, prompt, new))
    causal = generate(model, prompt, new, temperature=0.0)
    assert not torch.equal(cached[:, 8:], causal[:, 8:])  # the bidirectional prompt changes the output
    # sampling too: the same generator seed, the same tokens
    sampled = [generate(model, prompt, new, temperature=1.0, prompt_is_prefix=True, use_cache=use_cache,
                        generator=torch.Generator().manual_seed(1)) for use_cache in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


# ----------------------------------------------------------------------------- sample.py --infill
@pytest.fixture(scope="module")
def sample_script():
    return load_script("sample.py")


def test_infill_input_is_text_ids_with_sentinel_ids_then_eos(sample_script, tokenizer):
    ids = sample_script.infill_input_ids(tokenizer, "The cat <extra_id_0> on the <extra_id_1>.")
    # the space before each sentinel goes into the span; the sentinels are ids, not text
    want = (tokenizer.encode("The cat") + [SENTINEL_IDS[0]] + tokenizer.encode(" on the") + [SENTINEL_IDS[1]]
            + tokenizer.encode(".") + [EOS_ID])
    assert ids == want
    # any other special name typed in the text stays plain text
    ids = sample_script.infill_input_ids(tokenizer, "<mask> and <extra_id_0>")
    assert ids == tokenizer.encode("<mask> and") + [SENTINEL_IDS[0], EOS_ID]
    assert MASK_ID not in ids


def test_infill_text_puts_each_span_in_its_sentinel_place(sample_script, tokenizer):
    text = "The cat <extra_id_0> on the <extra_id_1>."
    stream = ([SENTINEL_IDS[0]] + tokenizer.encode(" sat") + [SENTINEL_IDS[1]] + tokenizer.encode(" mat")
              + [EOS_ID] + [EOS_ID] * 3)
    assert sample_script.infill_text(tokenizer, text, stream) == "The cat sat on the mat."
    # a stream cut off before its eos; a sentinel the model skipped (empty); tokens before the
    # first sentinel and after eos ignored; a repeated sentinel keeps its first span
    assert sample_script.infill_text(tokenizer, text, [SENTINEL_IDS[1]] + tokenizer.encode(" mat")) == \
        "The cat on the mat."
    noisy = (tokenizer.encode(" dog") + [SENTINEL_IDS[0]] + tokenizer.encode(" sat") + [SENTINEL_IDS[0]]
             + tokenizer.encode(" ran") + [EOS_ID, SENTINEL_IDS[1]] + tokenizer.encode(" hat"))
    assert sample_script.infill_text(tokenizer, text, noisy) == "The cat sat on the."
    assert sample_script.sentinel_spans([SENTINEL_IDS[0], 200, 201, SENTINEL_IDS[2], 202, EOS_ID, 203]) == \
        {SENTINEL_IDS[0]: [200, 201], SENTINEL_IDS[2]: [202]}


@pytest.mark.parametrize("text, message", [
    ("no sentinel here", "--infill needs at least one <extra_id_0> in the text"),
    ("a <extra_id_1> b", "<extra_id_1> is where <extra_id_0> should be"),
    ("a <extra_id_0> b <extra_id_0>", "<extra_id_0> is where <extra_id_1> should be"),
])
def test_infill_text_is_checked_before_loading(sample_script, text, message, tmp_path):
    with pytest.raises(UserError, match=message):
        sample_script.main(["--infill", text, "--ckpt", str(tmp_path / "none.pt")])


@pytest.mark.parametrize("flags, message", [
    (["--fill", "a <mask>", "--infill", "a <extra_id_0>"], "--fill .* and --infill .* exclude each other"),
    (["--beam_size", "2", "--prompt", "The"], "--beam_size is for --infill"),
    (["--beam_size", "0"], "--beam_size must be >= 1, got 0"),
    (["--length_penalty", "nan"], r"--length_penalty must be a finite number in \[-5, 5\], got nan"),
    (["--length_penalty", "1100"], r"--length_penalty must be in \[-5, 5\], got 1100"),
])
def test_sample_flags_that_cannot_work_are_refused_before_loading(sample_script, flags, message, tmp_path):
    with pytest.raises(UserError, match=message):
        sample_script.main([*flags, "--ckpt", str(tmp_path / "none.pt")])


@pytest.mark.parametrize("flag, kind, name, fills_masks, fragments", [
    ("fill", "seq2seq", "t5", False, ["--fill needs a masked-LM checkpoint", "seq2seq (t5)", "--infill"]),
    ("infill", "encoder", "mlm", True, ["--infill needs an encoder-decoder checkpoint", "encoder (mlm)", "--fill"]),
    ("infill", "decoder", "clm", False, ["--infill needs an encoder-decoder", "decoder (clm)", "--prompt"]),
    ("infill", "prefix_decoder", "prefix_lm", False, ["--infill needs", "--prompt"]),
    ("prompt", "seq2seq", "t5", False, ["seq2seq (t5)", "--infill"]),
])
def test_a_flag_the_checkpoint_cannot_serve_names_the_one_that_fits(sample_script, flag, kind, name, fills_masks,
                                                                  fragments):
    from minilm.objectives import objective_class
    args = dict(sample_script.DEFAULTS, **{flag: "x"})
    declared = objective_class(name)   # what the checkpoint can do is what its objective declares
    assert declared.model_kind == kind and ("fill" in declared.capabilities) == fills_masks
    with pytest.raises(UserError) as err:
        sample_script.check_flags_fit(args, declared, "out")
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_prompts_fit_decoders_and_prefix_lms(sample_script):
    from minilm.objectives import objective_class
    args = dict(sample_script.DEFAULTS, prompt="The")
    for name, kind in (("clm", "decoder"), ("prefix_lm", "prefix_decoder")):
        assert objective_class(name).model_kind == kind
        sample_script.check_flags_fit(args, objective_class(name), "out")  # no error


def test_print_infill_wiring_with_a_stand_in_t5_module(sample_script, tokenizer, capsys):
    """print_infill on an untrained EncoderDecoder (the t5 objective is written elsewhere: a
    stand-in objective gives its decoder_start_id): greedy prints one filling, sampling --num_samples,
    beam search the best min(num_samples, beam_size) with scores, best first; the filled text keeps
    the text around the sentinel."""
    import types
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=16, n_layer=1, n_decoder_layer=1, n_head=2, n_embd=32)
    objective = types.SimpleNamespace(backbone=EncoderDecoder(cfg).eval(), decoder_start_id=0,
                                      encoder_input=lambda ids, verb, mode="": [*ids, EOS_ID])
    base = dict(sample_script.DEFAULTS, infill="Once <extra_id_0> time.", max_new_tokens=6)
    for flags, headers in ((dict(temperature=0.0), 1), (dict(num_samples=2), 2), (dict(beam_size=3, num_samples=5), 3)):
        sample_script.print_infill(objective, tokenizer, dict(base, **flags), "cpu")
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert [ln.split(" (")[0] for ln in lines[0::2]] == [f"--- filling {i + 1}" for i in range(headers)]
        assert all(ln.startswith("Once") and ln.endswith(" time.") for ln in lines[1::2]), lines
        if "beam_size" in flags:
            scores = [float(ln.split("(score ")[1].rstrip(")")) for ln in lines[0::2]]
            assert scores == sorted(scores, reverse=True)
    # more new tokens than the decoder's window: cut to it, with a note
    sample_script.print_infill(objective, tokenizer, dict(base, temperature=0.0, max_new_tokens=100), "cpu")
    assert "note: the decoder writes at most 16 tokens" in capsys.readouterr().err
# End to end (a trained checkpoint through sample.py): tests/test_seq2seq_end_to_end.py.
