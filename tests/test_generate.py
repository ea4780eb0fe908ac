"""minilm/generate.py: the sampling distributions (temperature, top-k, top-p) checked by counting
many draws against probabilities computed here in float64, and greedy generation with and without
the KV cache, inside and beyond the context window."""
from __future__ import annotations

import math

import pytest
import torch

from minilm.config import ModelConfig
from minilm.errors import UserError
from minilm.generate import filter_logits, generate, sample_next
from minilm.model import Transformer

N = 200_000  # draws per distribution: one standard deviation of a frequency is <= 0.0011


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def softmax64(logits, temperature: float = 1.0, keep=None) -> torch.Tensor:
    """Probabilities in float64 from plain exp, renormalized over `keep` (indices) if given."""
    weights = [math.exp(x / temperature) for x in logits]
    if keep is not None:
        weights = [w if i in keep else 0.0 for i, w in enumerate(weights)]
    total = sum(weights)
    return torch.tensor([w / total for w in weights], dtype=torch.float64)


def draw_counts(logits, n: int = N, seed: int = 0, **kwargs) -> torch.Tensor:
    """Counts of each token over n draws of sample_next on one row of logits tiled n times."""
    row = torch.tensor(logits, dtype=torch.float32)
    ids = sample_next(row.expand(n, -1), generator=torch.Generator().manual_seed(seed), **kwargs)
    assert ids.shape == (n,)
    return torch.bincount(ids, minlength=row.numel()).double()


def assert_frequencies(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Tokens of probability 0 never drawn; every other count within 5 binomial sigmas."""
    n = counts.sum().item()
    assert torch.all(counts[probs == 0] == 0), f"dropped tokens were drawn: {counts.tolist()}"
    expected = n * probs
    sigma = torch.sqrt(n * probs * (1 - probs))
    bad = (counts - expected).abs() > 5 * sigma
    assert not bad.any(), f"counts {counts.tolist()} vs expected {expected.tolist()}"


def kept(filtered: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(filtered.reshape(-1))).flatten().tolist())


# ----------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = [1.0, 0.5, 0.0, -0.5, -1.0]
    counts = draw_counts(logits, temperature=temperature, seed=1)
    assert_frequencies(counts, softmax64(logits, temperature))


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature=0.0), want)
    # greedy ignores top-k / top-p and the generator: the same answer every time
    for seed in range(3):
        got = sample_next(logits, temperature=0.0, top_k=3, top_p=0.5,
                          generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.zeros(1000, 20)
    a = sample_next(logits, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, generator=torch.Generator().manual_seed(3))
    c = sample_next(logits, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- top-k
def test_top_k_with_ties_keeps_exactly_k():
    logits = [3.0, 2.0, 2.0, 2.0, 1.0, 0.0]  # three tokens tied at the k=2 boundary
    row = torch.tensor(logits)[None]
    filtered = filter_logits(row, top_k=2)
    keep = kept(filtered)
    assert len(keep) == 2                      # not 4, as a `logits >= kth` threshold would give
    assert 0 in keep and len(keep & {1, 2, 3}) == 1
    assert torch.equal(filtered[0, sorted(keep)], row[0, sorted(keep)])  # kept logits untouched

    counts = draw_counts(logits, top_k=2, seed=2)
    drawn = set(torch.nonzero(counts).flatten().tolist())
    assert len(drawn) == 2                     # exactly k distinct tokens ever appear
    assert 0 in drawn and len(drawn & {1, 2, 3}) == 1
    assert_frequencies(counts, softmax64(logits, keep=drawn))  # e/(1+e) and 1/(1+e)


def test_top_k_boundaries():
    logits = [0.3, -1.0, 2.0, 0.0, 1.0]
    row = torch.tensor(logits)[None]
    assert kept(filter_logits(row, top_k=1)) == {2}
    assert kept(filter_logits(row, top_k=3)) == {2, 4, 0}
    assert kept(filter_logits(row, top_k=5)) == set(range(5))   # k = V: all
    assert kept(filter_logits(row, top_k=50)) == set(range(5))  # k > V: all
    assert kept(filter_logits(row, top_k=0)) == set(range(5))   # 0 disables
    assert torch.all(draw_counts(logits, n=1000, top_k=1)[[0, 1, 3, 4]] == 0)
    assert_frequencies(draw_counts(logits, top_k=3, seed=3), softmax64(logits, keep={0, 2, 4}))
    # batched rows each keep their own top k
    rows = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    assert torch.equal(torch.isfinite(filter_logits(rows, top_k=2)),
                       torch.tensor([[False, False, True, True], [True, True, False, False]]))


# ----------------------------------------------------------------------------- top-p
LOGITS = [0.0, 2.0, -3.0, 1.0, -1.0, 0.5]  # deliberately unsorted
ORDER = [1, 3, 5, 0, 4, 2]                   # most to least probable


def cumulative(logits) -> list[float]:
    probs = softmax64(logits)
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    return [probs[order[:k + 1]].sum().item() for k in range(len(logits))]


def test_top_p_keeps_smallest_set_reaching_p_crossing_token_included():
    assert sorted(range(6), key=lambda i: -LOGITS[i]) == ORDER
    cum = cumulative(LOGITS)
    for k in range(1, 6):
        # p strictly inside (cum[k-1], cum[k]): the first k tokens fall short, so the k+1-th,
        # the one crossing p, is kept too
        p = (cum[k - 1] + cum[k]) / 2
        assert kept(filter_logits(torch.tensor(LOGITS)[None], top_p=p)) == set(ORDER[:k + 1]), p
    # p just below a boundary still needs the boundary token; just above needs one more
    assert kept(filter_logits(torch.tensor(LOGITS)[None], top_p=cum[1] - 1e-4)) == set(ORDER[:2])
    assert kept(filter_logits(torch.tensor(LOGITS)[None], top_p=cum[1] + 1e-4)) == set(ORDER[:3])

    p = (cum[1] + cum[2]) / 2  # keeps the top 3
    counts = draw_counts(LOGITS, top_p=p, seed=4)
    assert_frequencies(counts, softmax64(LOGITS, keep=set(ORDER[:3])))


def test_top_p_below_the_top_probability_keeps_only_the_top_token():
    top = softmax64(LOGITS).max().item()
    for p in (0.0, 0.01, top / 2, top - 1e-4):  # never empty: the top token is always kept
        assert kept(filter_logits(torch.tensor(LOGITS)[None], top_p=p)) == {1}
    counts = draw_counts(LOGITS, n=10_000, top_p=top / 2, seed=5)
    assert counts[1] == 10_000


def test_top_p_exactly_on_a_boundary():
    # uniform logits give exactly representable probabilities 0.25: p = 0.5 is reached by two
    # tokens, so exactly two are kept (the third's mass-before, 0.5, is not below p)
    row = torch.zeros(1, 4)
    for p, n_kept in ((0.25, 1), (0.5, 2), (0.75, 3), (0.5 - 1e-6, 2), (0.5 + 1e-6, 3)):
        assert len(kept(filter_logits(row, top_p=p))) == n_kept, p
    counts = draw_counts([0.0] * 4, top_p=0.5, seed=6)
    drawn = set(torch.nonzero(counts).flatten().tolist())
    assert len(drawn) == 2
    assert_frequencies(counts, softmax64([0.0] * 4, keep=drawn))  # 1/2 each

    # non-uniform: p equal to the float32 cumulative sum that filter_logits itself computes
    # keeps exactly that many tokens, never one more (regression: mass-before used to be
    # computed as cumsum - probs, whose rounding kept an extra token in ~1 case in 8)
    g = torch.Generator().manual_seed(7)
    for _ in range(200):
        row = 2 * torch.randn(1, 8, generator=g)
        cum32 = torch.softmax(row, dim=-1).sort(dim=-1, descending=True).values.cumsum(dim=-1)[0]
        for k in range(1, 7):
            p = cum32[k - 1].item()
            if p < 1.0:
                assert len(kept(filter_logits(row, top_p=p))) == k, (row, k)


def test_top_p_one_keeps_everything():
    logits = [2.0, 0.0, -2.0, -20.0]  # the last has probability ~2e-10: still kept at p = 1
    assert kept(filter_logits(torch.tensor(logits)[None], top_p=1.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(torch.tensor(logits)[None], top_p=0.999)) == {0, 1, 2}
    assert_frequencies(draw_counts(logits, top_p=1.0, seed=8), softmax64(logits))


def test_top_k_applies_before_top_p():
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]
    # renormalized over the top 3, the top two hold 0.86 >= 0.8; over all six only 0.77 < 0.8.
    # Top-k first then top-p keeps 2 tokens; the other order would keep 3.
    top3 = softmax64(logits, keep={0, 1, 2})
    assert top3[0] < 0.8 <= top3[0] + top3[1]
    assert softmax64(logits)[:2].sum() < 0.8
    assert kept(filter_logits(torch.tensor(logits)[None], top_k=3, top_p=0.8)) == {0, 1}
    counts = draw_counts(logits, top_k=3, top_p=0.8, seed=9)
    assert_frequencies(counts, softmax64(logits, keep={0, 1}))


def test_filters_act_after_temperature():
    # softmax([2, 1, 0]) top prob 0.665; at T = 4 the top prob is 0.42: top_p = 0.5 keeps 1 token
    # at T = 1 but 2 tokens at T = 4
    logits = [2.0, 1.0, 0.0]
    assert softmax64(logits)[0] > 0.5 > softmax64(logits, 4.0)[0]
    assert torch.all(draw_counts(logits, n=5000, top_p=0.5, seed=10)[1:] == 0)
    counts = draw_counts(logits, temperature=4.0, top_p=0.5, seed=11)
    assert_frequencies(counts, softmax64(logits, 4.0, keep={0, 1}))


# ----------------------------------------------------------------------------- generation
SEQ_LEN = 32


def make_model(seed: int = 0) -> Transformer:
    """A tiny model with large random weights, so its greedy continuations depend on the context
    (at the 0.02 init every position predicts nearly the same token, and at 1/sqrt(fan_in) greedy
    decoding soon repeats one token)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=97, seq_len=SEQ_LEN, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(3 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding written out: each token is the argmax after a full forward over the last
    seq_len tokens."""
    model.eval()
    tokens = prompt
    for _ in range(n):
        hidden = model(tokens[:, -SEQ_LEN:])
        tokens = torch.cat([tokens, model.logits(hidden[:, -1]).argmax(dim=-1, keepdim=True)], dim=1)
    return tokens


# (prompt length, new tokens, warnings expected)
GEN_CASES = [
    (5, 20, 0),    # fits: 25 <= 32
    (12, 20, 0),   # fits exactly: 32 tokens
    (12, 21, 0),   # 33 tokens, but the last forward pass still sees only 32: nothing truncated
    (12, 22, 1),   # the 34th token is predicted from the last 32 of 33: sliding window
    (20, 20, 1),   # well past the window
    (40, 20, 1),   # the prompt alone is longer than the window
]


@pytest.mark.parametrize("prompt_len,new,n_warn", GEN_CASES)
def test_greedy_generation_cache_matches_no_cache(prompt_len, new, n_warn):
    model = make_model()
    prompt = torch.randint(0, 97, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    want = reference_greedy(model, prompt, new)
    # the comparison means something only if the continuation is not one repeated token
    assert len(torch.unique(want[:, prompt_len:])) > 3
    model.train()  # generate switches to eval and back
    for use_cache in (True, False):
        warnings = []
        got = generate(model, prompt, new, temperature=0.0, use_cache=use_cache, warn=warnings.append)
        assert got.shape == (2, prompt_len + new)
        assert torch.equal(got[:, :prompt_len], prompt)
        assert torch.equal(got, want), f"use_cache={use_cache}"
        assert len(warnings) == n_warn, warnings
        assert model.training


def test_generate_without_warn_callback_overflows_quietly():
    model = make_model()
    prompt = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, 10, temperature=0.0, warn=None)
    assert torch.equal(out, reference_greedy(model, prompt, 10))


@pytest.mark.parametrize("temperature", [0.0, 1.0])   # greedy picked garbage; sampling failed in multinomial
@pytest.mark.parametrize("use_cache", [True, False])
def test_nan_weights_are_a_one_line_error_not_garbage(temperature, use_cache):
    model = make_model()
    with torch.no_grad():
        model.tok_emb.weight.fill_(float("nan"))
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match=r"^the model produced NaN or infinite logits: its weights are damaged"):
        generate(model, prompt, 4, temperature=temperature, use_cache=use_cache)
