"""The explainer's rows and masks for t5, ul2 and plm (their `explain`, minilm/objectives/): the
explanation is the batch make_batch made (its tensors decoded), every mask is what forward hands
attention() (recorded there), and the parts that are easy to get wrong hold on rows whose random
choices the seed fixes: T5's sentinels in order, each hiding the seed's noise span; UL2's mode
token and denoiser; XLNet's query stream never sees its own token."""
from __future__ import annotations

import pytest
import torch

from minilm import masking, model
from minilm.config import ModelConfig
from minilm.explain import DASH, pieces, targets
from minilm.objectives import build_objective
from minilm.objectives.base import IGNORE
from minilm.objectives.plm import PermutationLMOptions
from minilm.objectives.t5 import SpanCorruptionOptions
from minilm.objectives.ul2 import MODE_IDS, MODE_TOKENS, SPAN_SENTINEL_IDS, UL2Options
from minilm.tokenizer import EOS_ID, SENTINEL_IDS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

UL2_DEFAULT = ("R:3:0.15", "X:32:0.15", "X:3:0.5", "S:0.25")


def build(name, tokenizer, seq_len, options):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=seq_len, n_layer=2, n_head=2, n_embd=32)
    return build_objective(name, cfg, tokenizer, options)


def one_row(objective, tokenizer, texts, seed=0):
    """(raw (1, L), batch): real text cut to the objective's window, corrupted with the seed."""
    length = objective.raw_length if hasattr(objective, "raw_length") else objective.seq_len + 1
    ids = tokenizer.encode(" ".join(texts[:4]), eos=True)[:length]
    raw = torch.tensor([ids])
    return raw, objective.make_batch(raw, torch.Generator().manual_seed(seed))


def received_masks(objective, batch, monkeypatch) -> dict[tuple[int, int], torch.Tensor]:
    """Every mask forward hands attention(), as the (queries, keys) bool grid it means, keyed by
    that shape; masks of one shape must all agree (one per kind of attention in these models)."""
    seen = {}
    real_attention = model.attention

    def recording(q, k, v, *, mask=None, dropout_p=0.0):
        Q, K = q.shape[-2], k.shape[-2]
        if mask is None:
            grid = torch.ones(Q, K, dtype=torch.bool)
        elif isinstance(mask, str):
            grid = torch.ones(Q, K, dtype=torch.bool).tril()       # CAUSAL: query i sees keys 0..i
        else:
            grid = torch.broadcast_to(mask, (1, 1, Q, K))[0, 0]
        assert torch.equal(seen.setdefault((Q, K), grid), grid), f"two different masks of shape {(Q, K)}"
        return real_attention(q, k, v, mask=mask, dropout_p=dropout_p)

    monkeypatch.setattr(model, "attention", recording)
    with torch.no_grad():
        objective(batch)
    return seen


def check_masks(explained, objective, batch, monkeypatch):
    received = received_masks(objective, batch, monkeypatch)
    grids = {tuple(grid.shape): grid for _, _, grid in explained.masks.values()}
    assert len(grids) == len(explained.masks) == len(received), "one explained mask per mask forward uses"
    for shape, grid in received.items():
        assert torch.equal(grids[shape], grid), f"the {shape} mask differs from forward's"
    for title, (query_labels, key_labels, grid) in explained.masks.items():
        assert grid.dtype == torch.bool and grid.shape == (len(query_labels), len(key_labels)), title


# ----------------------------------------------------------------------------- t5
@pytest.mark.parametrize("noise_density, mean_span", [(0.15, 3.0), (0.4, 2.0)])
def test_t5_explanation_is_the_batch_and_its_masks_are_forwards(tokenizer, texts, monkeypatch, noise_density,
                                                                mean_span):
    objective = build("t5", tokenizer, 64, SpanCorruptionOptions(noise_density=noise_density,
                                                                 mean_noise_span_length=mean_span))
    _, batch = one_row(objective, tokenizer, texts)
    explained = objective.explain(batch, tokenizer)
    assert explained.columns["reads"] == pieces(tokenizer, batch["input_ids"][0])
    assert explained.columns["target"] == [DASH] * 64               # the encoder predicts nothing
    assert explained.decoder["reads"] == pieces(tokenizer, batch["decoder_input_ids"][0])
    assert explained.decoder["target"] == targets(tokenizer, batch["labels"][0], IGNORE)
    assert all(len(column) == 64 for column in explained.columns.values())
    assert all(len(column) == batch["labels"].shape[1] for column in explained.decoder.values())
    check_masks(explained, objective, batch, monkeypatch)
    # t5's rows are never padded: the encoder and the cross-attention see everything
    assert explained.masks["encoder self-attention"][2].all() and explained.masks["cross-attention"][2].all()
    assert not explained.masks["decoder causal self-attention"][2].triu(1).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_t5_sentinels_in_order_each_hiding_the_seeds_noise_span(tokenizer, texts, seed):
    """The same seed's noise mask (masking.noise_span_corruption, what make_batch calls first)
    says which raw tokens were hidden: span k must be <extra_id_k>'s, in the encoder ("hides")
    and in the decoder ("hidden in"), and putting the spans back gives the raw text."""
    objective = build("t5", tokenizer, 64, None)
    raw, batch = one_row(objective, tokenizer, texts, seed)
    _, _, noise = masking.noise_span_corruption(raw, torch.Generator().manual_seed(seed))
    raw_pieces, noise = pieces(tokenizer, raw[0]), noise[0].tolist()
    spans = []                                                  # the seed's noise spans, left to right
    for t, hidden in enumerate(noise):
        if hidden and (t == 0 or not noise[t - 1]):
            spans.append([])
        if hidden:
            spans[-1].append(raw_pieces[t])
    assert len(spans) >= 2

    explained = objective.explain(batch, tokenizer)
    reads, hides = explained.columns["reads"], explained.columns["hides"]
    sentinels = [piece for piece in reads if piece.startswith("<extra_id_")]
    assert sentinels == [f"<extra_id_{k}>" for k in range(len(spans))]
    assert [hides[reads.index(s)].split(" ") for s in sentinels] == spans
    assert all(h == DASH for piece, h in zip(reads, hides) if piece not in sentinels)
    # the decoder: each sentinel, then its span's tokens, each "hidden in" that sentinel
    decoder_target, hidden_in = explained.decoder["target"], explained.decoder["hidden in"]
    expected_target, expected_hidden_in = [], []
    for s, span in zip(sentinels, spans):
        expected_target += [s, *span]
        expected_hidden_in += [DASH] + [s] * len(span)
    assert decoder_target == expected_target + [tokenizer.id_to_piece(EOS_ID)]
    assert hidden_in == expected_hidden_in + [DASH]
    # lossless: each sentinel replaced by what it hides is the raw window, then <eos>
    rebuilt = [p for piece, h in zip(reads, hides) for p in (h.split(" ") if piece in sentinels else [piece])]
    assert rebuilt == raw_pieces + [tokenizer.id_to_piece(EOS_ID)]
    assert any(f"{len(spans)} noise spans hide" in note for note in explained.notes)


# ----------------------------------------------------------------------------- ul2
@pytest.mark.parametrize("spec", UL2_DEFAULT)
def test_ul2_explanation_is_the_batch_with_its_mode_denoiser_and_padding(tokenizer, texts, monkeypatch, spec):
    weights = ",".join("1" if d == spec else "0" for d in UL2_DEFAULT)   # every row draws `spec`
    objective = build("ul2", tokenizer, 64, UL2Options(ul2_weights=weights))
    _, batch = one_row(objective, tokenizer, texts)
    explained = objective.explain(batch, tokenizer)
    length, mode = int(batch["input_lengths"][0]), spec[0]
    reads = explained.columns["reads"]
    assert reads == pieces(tokenizer, batch["input_ids"][0])
    assert explained.decoder["reads"] == pieces(tokenizer, batch["decoder_input_ids"][0])
    assert explained.decoder["target"] == targets(tokenizer, batch["labels"][0], IGNORE)
    assert reads[0] == tokenizer.id_to_piece(MODE_IDS[mode])
    assert explained.columns["denoiser"] == ([f"{spec} mode {MODE_TOKENS[mode]}"] + [DASH] * (length - 1)
                                             + ["padding"] * (64 - length))
    assert explained.notes[0].startswith(f"denoiser {spec} drawn") and MODE_TOKENS[mode] in explained.notes[0]
    check_masks(explained, objective, batch, monkeypatch)
    # the encoder and the cross-attention skip exactly the padded input keys
    for title in ("encoder self-attention", "cross-attention"):
        grid = explained.masks[title][2]
        assert grid[:, :length].all() and not grid[:, length:].any(), title
    hides = [h for h in explained.columns["hides"] if h != DASH]
    if mode == "S":
        assert length < 64 and not hides and set(explained.decoder["hidden in"]) == {DASH}
    else:   # span sentinels from <extra_id_0> in order, the mode tokens never
        sentinels = [p for p in reads[1:] if p.startswith("<extra_id_")]
        assert sentinels == [tokenizer.id_to_piece(i) for i in SPAN_SENTINEL_IDS[:len(sentinels)]]
        assert len(hides) == len(sentinels) > 0


# ----------------------------------------------------------------------------- plm
@pytest.mark.parametrize("span_targets", [False, True])
def test_plm_explanation_is_the_batch_and_its_masks_are_the_two_streams(tokenizer, texts, monkeypatch,
                                                                        span_targets):
    objective = build("plm", tokenizer, 24, PermutationLMOptions(plm_partial_k=4, plm_span_targets=span_targets))
    _, batch = one_row(objective, tokenizer, texts)
    explained = objective.explain(batch, tokenizer)
    reads, ranks = explained.columns["reads"], batch["ranks"][0].tolist()
    assert reads == pieces(tokenizer, batch["input_ids"][0])
    assert explained.columns["rank"] == [str(r) for r in ranks]
    positions = batch["target_positions"][0].tolist()           # in the order: slot m has rank m + 1
    predicted = pieces(tokenizer, batch["targets"][0])
    assert [explained.columns["target"][p] for p in positions] == predicted
    assert [ranks[p] for p in positions] == list(range(1, len(positions) + 1))
    assert all(explained.columns["target"][t] == DASH and explained.columns["target?"][t] == "no"
               for t in range(24) if t not in positions)
    assert [explained.columns["target?"][p] for p in positions] == ["yes"] * len(positions)
    check_masks(explained, objective, batch, monkeypatch)
    assert list(explained.masks) == ["content stream", "query stream"]
    assert explained.masks["query stream"][0] == predicted and explained.masks["query stream"][1] == reads


@pytest.mark.parametrize("seed", range(4))
def test_plm_query_stream_never_sees_its_own_token(tokenizer, texts, seed):
    objective = build("plm", tokenizer, 24, PermutationLMOptions(plm_partial_k=3))
    _, batch = one_row(objective, tokenizer, texts, seed)
    explained = objective.explain(batch, tokenizer)
    content, query = explained.masks["content stream"][2], explained.masks["query stream"][2]
    ranks = torch.tensor([int(r) for r in explained.columns["rank"]])
    positions = [t for r in range(1, int(ranks.max()) + 1) for t in range(24) if ranks[t] == r]
    assert len(positions) == 8 and query.shape == (8, 24)
    for slot, position in enumerate(positions):
        assert not query[slot, position], "a target's query must not see its own token"
        assert torch.equal(query[slot], ranks <= slot), "it sees exactly the tokens before it in the order"
        assert content[position, position], "its content stream does see it"
    assert content.diagonal().all()
    context = ranks == 0
    assert not content[context][:, ~context].any(), "the context never sees a target"
