"""T5 span corruption (minilm/masking.py, section "T5 span corruption"): the window lengths of
T5's random_spans_helper, an exact round trip from (input, target) back to the raw window, the
layout (non-noise first, one sentinel per span in fixed order, <eos> last), the span-length law
of a uniformly random composition (chi-square, on noise spans and on non-noise segments), and
reproducibility from the generator.

The counts, the lengths, the round trip and the span-length pmf are recomputed here from the
issue's definitions, in plain Python, without calling the code under test."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minilm import masking
from minilm.errors import UserError
from minilm.tokenizer import EOS_ID, NUM_SPECIAL, SENTINEL_IDS

V = 8192
SENTINELS = set(SENTINEL_IDS)
# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_CRITICAL_0_001 = {5: 20.515, 6: 22.458, 7: 24.322}


def expected_counts(raw_length, density, mean):
    """(noise tokens, noise spans) as the issue defines them."""
    noise = min(max(round(raw_length * density), 1), raw_length - 1)
    return noise, max(1, round(noise / mean))


def expected_lengths(raw_length, density, mean):
    """(input length, target length): non-noise (noise) tokens + one sentinel per span + <eos>."""
    noise, spans = expected_counts(raw_length, density, mean)
    return raw_length - noise + spans + 1, noise + spans + 1


def corrupt(rows, raw_length, seed, density=0.15, mean=3.0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(NUM_SPECIAL, V, (rows, raw_length), generator=g)
    inputs, targets, noise = masking.noise_span_corruption(raw, g, noise_density=density, mean_noise_span_length=mean)
    return raw, inputs, targets, noise


def reconstruct(inputs, targets):
    """The raw window from one row's input and target (lists): each sentinel in the input is
    replaced by the tokens that follow the same sentinel in the target."""
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    hidden, current = {}, None
    for token in targets[:-1]:
        if token in SENTINELS:
            assert token not in hidden
            current, hidden[token] = token, []
        else:
            hidden[current].append(token)
    window = []
    for token in inputs[:-1]:
        window.extend(hidden.pop(token) if token in SENTINELS else [token])
    assert not hidden, "a target span whose sentinel is not in the input"
    return window


def run_lengths(mask):
    """(rows, runs) long: lengths of the maximal runs of True in each row, left to right
    (every row must have the same number of runs)."""
    edges = torch.diff(F.pad(mask.long(), (1, 1)), dim=1)
    starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    return (ends - starts).view(mask.shape[0], -1)


def composition_part_pmf(n, k):
    """P(len = j), j = 1..n-k+1, of one part of a uniformly random composition of n into k
    positive parts: the other k-1 parts compose n-j, C(n-j-1, k-2) ways out of C(n-1, k-1)."""
    return [math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1) for j in range(1, n - k + 2)]


def chi_square(lengths, pmf, bins):
    """Pearson's statistic and degrees of freedom. bins: (first, last) length ranges, inclusive;
    the last bin takes everything from its first length on."""
    lengths = lengths.flatten()
    statistic = 0.0
    for index, (first, last) in enumerate(bins):
        if index == len(bins) - 1:
            observed, probability = int((lengths >= first).sum()), sum(pmf[first - 1:])
        else:
            observed, probability = int(((lengths >= first) & (lengths <= last)).sum()), sum(pmf[first - 1:last])
        expected = probability * len(lengths)
        assert expected > 20
        statistic += (observed - expected) ** 2 / expected
    return statistic, len(bins) - 1


# settings: (raw length, density, mean span length); rows and seeds vary per test
SETTINGS = [(568, 0.15, 3.0), (336, 0.3, 5.0), (57, 0.5, 2.0), (7, 0.15, 3.0), (2, 0.15, 3.0)]


# ----------------------------------------------------------------------------- lengths
def test_lengths_of_the_issue_568_512_114():
    assert masking.noise_span_window(512) == (568, 114)
    assert masking.noise_span_output_lengths(568) == (512, 114)
    assert masking.noise_span_counts(568) == (85, 28)
    assert masking.noise_span_window(256) == (284, 58)
    assert masking.noise_span_window(128) == (141, 29)
    _, inputs, targets, _ = corrupt(4, 568, seed=0)
    assert inputs.shape == (4, 512) and targets.shape == (4, 114)
    assert inputs.dtype == targets.dtype == torch.long


@pytest.mark.parametrize("input_length,density,mean", [(256, 0.3, 5.0), (64, 0.5, 2.0), (8, 0.15, 3.0),
                                                       (3, 0.15, 3.0), (100, 0.15, 3.0)])
def test_lengths_match_brute_force(input_length, density, mean):
    """The longest raw window whose input is exactly input_length, by trying every length."""
    fits = [L for L in range(2, 4 * input_length) if expected_lengths(L, density, mean)[0] == input_length]
    raw_length = max(fits)
    target_length = expected_lengths(raw_length, density, mean)[1]
    assert masking.noise_span_window(input_length, density, mean) == (raw_length, target_length)
    _, inputs, targets, _ = corrupt(3, raw_length, seed=1, density=density, mean=mean)
    assert inputs.shape == (3, input_length) and targets.shape == (3, target_length)


# ----------------------------------------------------------------------------- round trip and layout
@pytest.mark.parametrize("raw_length,density,mean", SETTINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_lossless(raw_length, density, mean, seed):
    raw, inputs, targets, noise = corrupt(256, raw_length, seed, density, mean)
    for row in range(len(raw)):
        assert reconstruct(inputs[row].tolist(), targets[row].tolist()) == raw[row].tolist()
        # the mask says which tokens the target holds
        hidden = [t for t in targets[row].tolist()[:-1] if t not in SENTINELS]
        assert raw[row][noise[row]].tolist() == hidden


@pytest.mark.parametrize("raw_length,density,mean", SETTINGS)
def test_layout_counts_and_sentinel_order(raw_length, density, mean):
    rows = 512
    raw, inputs, targets, noise = corrupt(rows, raw_length, 3, density, mean)
    num_noise, num_spans = expected_counts(raw_length, density, mean)
    assert (inputs.shape[1], targets.shape[1]) == expected_lengths(raw_length, density, mean)
    assert not noise[:, 0].any(), "the window must start with non-noise"
    assert noise[:, -1].all(), "the window ends with noise (noise span k-1 comes last)"
    assert (noise.sum(dim=1) == num_noise).all()
    # num_spans maximal runs of each kind: an empty segment would merge its neighbours
    assert run_lengths(noise).shape == (rows, num_spans)
    assert run_lengths(~noise).shape == (rows, num_spans)
    in_order = torch.tensor(SENTINEL_IDS[:num_spans]).expand(rows, -1)
    for ids in (inputs, targets):
        is_sentinel = (ids >= SENTINEL_IDS[0]) & (ids <= SENTINEL_IDS[-1])
        assert (is_sentinel.sum(dim=1) == num_spans).all()
        assert torch.equal(ids[is_sentinel].view(rows, num_spans), in_order)
        assert (ids[:, -1] == EOS_ID).all() and (ids[:, :-1] != EOS_ID).all()
    assert (targets[:, 0] == SENTINEL_IDS[0]).all()
    # a sentinel in the input stands where its span was: right after a non-noise token
    assert not ((inputs[:, :-1] >= SENTINEL_IDS[0]) & (inputs[:, :-1] <= SENTINEL_IDS[-1])
                & (inputs[:, 1:] >= SENTINEL_IDS[0]) & (inputs[:, 1:] <= SENTINEL_IDS[-1])).any()


def test_two_token_window_is_token_sentinel_then_sentinel_token():
    raw = torch.tensor([[500, 600]])
    inputs, targets, noise = masking.noise_span_corruption(raw, torch.Generator().manual_seed(0))
    assert inputs.tolist() == [[500, SENTINEL_IDS[0], EOS_ID]]
    assert targets.tolist() == [[SENTINEL_IDS[0], 600, EOS_ID]]
    assert noise.tolist() == [[False, True]]


# ----------------------------------------------------------------------------- span-length law
def test_composition_pmf_of_the_issue():
    pmf = composition_part_pmf(85, 28)
    assert [round(p, 3) for p in pmf[:3]] == [0.321, 0.221, 0.151]
    assert math.isclose(sum(pmf), 1.0) and math.isclose(sum(j * p for j, p in enumerate(pmf, 1)), 85 / 28)


def test_noise_span_lengths_follow_uniform_composition():
    """85 noise tokens in 28 spans, pooled over 2000 rows (56000 spans). The parts of one row
    are negatively correlated (they sum to 85), which only makes the pooled statistic smaller
    than a chi-square: the test is conservative, and still far from blind (see the report)."""
    _, _, _, noise = corrupt(2000, 568, seed=4)
    lengths = run_lengths(noise)
    assert lengths.shape == (2000, 28) and (lengths.sum(dim=1) == 85).all()
    bins = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, None)]
    statistic, dof = chi_square(lengths, composition_part_pmf(85, 28), bins)
    assert statistic < CHI2_CRITICAL_0_001[dof], statistic


def test_nonnoise_segment_lengths_follow_uniform_composition():
    """483 non-noise tokens in 28 segments: the same law, wider bins (mean 17.25)."""
    _, _, _, noise = corrupt(2000, 568, seed=5)
    lengths = run_lengths(~noise)
    assert lengths.shape == (2000, 28) and (lengths.sum(dim=1) == 483).all()
    bins = [(1, 3), (4, 6), (7, 10), (11, 15), (16, 22), (23, 32), (33, None)]
    statistic, dof = chi_square(lengths, composition_part_pmf(483, 28), bins)
    assert statistic < CHI2_CRITICAL_0_001[dof], statistic


# ----------------------------------------------------------------------------- randomness and errors
def test_same_seed_same_corruption_other_seed_other():
    first, second, other = corrupt(8, 568, seed=7), corrupt(8, 568, seed=7), corrupt(8, 568, seed=8)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(other[3], first[3])   # another seed: other windows, other noise
    raw = first[0]
    g = torch.Generator().manual_seed(9)
    again = masking.noise_span_corruption(raw, g)
    assert not torch.equal(again[2], first[2])
    assert not torch.equal(again[2], masking.noise_span_corruption(raw, g)[2]), "each call draws anew"


def test_more_spans_than_sentinels_is_an_error():
    assert masking.noise_span_window(1800)[0] < 2000
    with pytest.raises(ValueError, match="needs 114 noise spans but there are only 100 sentinel ids"):
        masking.noise_span_window(2048)
    with pytest.raises(UserError, match="only 100 sentinel ids"):
        masking.noise_span_corruption(torch.full((1, 2272), 500), torch.Generator())


@pytest.mark.parametrize("call,message", [
    (lambda: masking.noise_span_counts(10, 0.9, 1.0), "9 noise spans but only 1 non-noise tokens"),
    (lambda: masking.noise_span_counts(100, 0.0), "noise density must be between 0 and 1"),
    (lambda: masking.noise_span_window(512, 1.0), "noise density must be between 0 and 1"),
    (lambda: masking.noise_span_window(512, 0.15, 0.5), "mean noise span length must be at least 1"),
    (lambda: masking.noise_span_window(2), "at least 3 tokens"),
    (lambda: masking.noise_span_corruption(torch.ones(2, 1, dtype=torch.long), None), "at least 2 tokens"),
])
def test_impossible_settings_are_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_and_round_trips():
    g = torch.Generator(device="cuda").manual_seed(0)
    raw = torch.randint(NUM_SPECIAL, V, (64, 568), generator=g, device="cuda")
    inputs, targets, noise = masking.noise_span_corruption(raw, g)
    assert inputs.device.type == targets.device.type == noise.device.type == "cuda"
    inputs, targets, raw = inputs.cpu(), targets.cpu(), raw.cpu()
    for row in range(len(raw)):
        assert reconstruct(inputs[row].tolist(), targets[row].tolist()) == raw[row].tolist()
