"""The explainer's view of the sentence objectives (sop and nsp, simcse and simcse_sup, classify,
a+b): each explanation is its batch decoded (reads, targets, segments, views), its masks are the
ones forward hands the backbone (recorded by a hook, not rebuilt here), and on hand-built rows
whose random choices are known the labels and notes say what was drawn."""
from __future__ import annotations

import json

import pytest
import torch

from minilm.config import ModelConfig, ObjectiveConfig
from minilm.data import pack_pairs
from minilm.data.sentences import frame_sentences
from minilm.explain import DASH, Explained, pieces
from minilm.model import causal_mask
from minilm.objectives import IGNORE, build_objective
from minilm.objectives.sop import SWAP_PROB
from minilm.tokenizer import PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py

T = 24
FIRST, SECOND = "The cat sat on the mat.", "Then it slept."


def tiny(name, tokenizer, dropout=0.0, **options):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=T, n_layer=1, n_head=2, n_embd=16, dropout=dropout)
    section = ObjectiveConfig()
    for key, value in options.items():
        setattr(section, key, value)
    torch.manual_seed(0)
    return build_objective(name, cfg, tokenizer, section)


def pair_rows(tokenizer, texts, documents=None):
    """SegmentPairSource rows `[CLS] A [SEP] B [SEP] [PAD]...` of (A, B) texts, built with the
    source's own pack_pairs: one row per pair, row i from document documents[i] (i by default)."""
    a = [tokenizer.encode(first) for first, _ in texts]
    b = [tokenizer.encode(second) for _, second in texts]
    flat = torch.tensor([t for x, y in zip(a, b) for t in x + y])
    a_len, b_len = torch.tensor([len(x) for x in a]), torch.tensor([len(y) for y in b])
    a_start = torch.cumsum(a_len + b_len, 0) - a_len - b_len
    ids, segments, lengths = pack_pairs(flat, a_start, a_len, a_start + a_len, b_len, T)
    documents = torch.arange(len(texts)) if documents is None else torch.tensor(documents)
    return {"input_ids": ids, "segment_ids": segments, "lengths": lengths, "a_lengths": a_len,
            "b_lengths": b_len, "documents": documents}


def seed_drawing(flip: bool, rows: int = 1) -> int:
    """A seed whose generator makes sop's make_batch swap row 0 (flip) or keep it in order."""
    for seed in range(100):
        if bool(torch.rand(rows, generator=torch.Generator().manual_seed(seed))[0] < SWAP_PROB) == flip:
            return seed
    raise AssertionError("no seed in 0..99 draws that")


def batch_of(objective, raw, seed):
    return objective.make_batch(raw, torch.Generator().manual_seed(seed))


def masks_forward_uses(objective, batch) -> list[torch.Tensor]:
    """Every mask the backbone receives when forward runs on `batch`, recorded at the backbone."""
    seen = []
    backbone = objective.backbone
    original = backbone.forward

    def recording(*args, **kwargs):
        seen.append(kwargs.get("mask"))
        return original(*args, **kwargs)

    backbone.forward = recording
    try:
        with torch.no_grad():
            objective(batch)
    finally:
        del backbone.forward
    return seen


def as_grid(mask, T) -> torch.Tensor:
    """A mask as the backbone takes it ((B, 1, 1, T) padding: keys) -> row 0's (T, T) grid."""
    return mask[0, 0].expand(T, T)


def check_shape(explained: Explained, T: int):
    assert list(explained.columns)[:2] == ["reads", "target"]
    assert all(len(values) == T for values in explained.columns.values())
    for queries, keys, grid in explained.masks.values():
        assert grid.dtype == torch.bool and grid.shape == (len(queries), len(keys))


# ---------------------------------------------------------------------------------------- sop / nsp
@pytest.mark.parametrize("task", ["sop", "nsp"])
def test_sentence_pair_explanation_is_its_batch(task, tokenizer):
    objective = tiny("sop", tokenizer, sentence_task=task)
    # two rows of two documents, so that nsp has a partner: the explanation is row 0's
    batch = batch_of(objective, pair_rows(tokenizer, [(FIRST, SECOND), ("Rain fell all day.", "Birds sang.")]), 0)
    explained = objective.explain(batch, tokenizer)
    check_shape(explained, T)
    length = int(batch["lengths"][0])
    assert explained.columns["reads"] == pieces(tokenizer, batch["input_ids"][0])
    assert explained.columns["segment"] == ["AB"[s] for s in batch["segment_ids"][0, :length].tolist()] \
        + [DASH] * (T - length)
    queries, keys, grid = explained.masks["padding (encoder, both ways)"]
    assert queries == keys == explained.columns["reads"]
    [used] = masks_forward_uses(objective, batch)
    assert torch.equal(grid, as_grid(used, T))
    assert grid[:, :length].all() and not grid[:, length:].any()


@pytest.mark.parametrize("swapped", [False, True])
def test_sop_on_a_hand_built_pair_says_whether_it_swapped(swapped, tokenizer):
    """A known pair and a seed known to swap it or not: the rows, segments, label and note follow."""
    objective = tiny("sop", tokenizer)
    a, b = tokenizer.encode(FIRST), tokenizer.encode(SECOND)
    batch = batch_of(objective, pair_rows(tokenizer, [(FIRST, SECOND)]), seed_drawing(swapped))
    explained = objective.explain(batch, tokenizer)
    first, second = (b, a) if swapped else (a, b)
    n = len(a) + len(b) + 3
    assert explained.columns["reads"][:n] == (["<cls>"] + pieces(tokenizer, first) + ["<sep>"]
                                              + pieces(tokenizer, second) + ["<sep>"])
    assert set(explained.columns["reads"][n:]) == {tokenizer.id_to_piece(PAD_ID)}
    assert explained.columns["segment"] == ["A"] * (len(first) + 2) + ["B"] * (len(second) + 1) + [DASH] * (T - n)
    assert explained.columns["target"] == ["swapped" if swapped else "in order"] + [DASH] * (T - 1)
    assert int(batch["labels"][0]) == int(swapped)
    assert explained.notes[0].startswith(f"label {int(swapped)}, {'swapped' if swapped else 'in order'}:")


def test_nsp_random_b_comes_from_the_other_document_and_one_row_has_no_label(tokenizer):
    objective = tiny("sop", tokenizer, sentence_task="nsp")
    # two rows of two documents: a seed that flips row 0 gives it row 1's B
    other = ("Rain fell all day.", "Birds sang.")
    raw = pair_rows(tokenizer, [(FIRST, SECOND), other])
    batch = batch_of(objective, raw, seed_drawing(True, rows=2))
    explained = objective.explain(batch, tokenizer)
    a, b = tokenizer.encode(FIRST), tokenizer.encode(other[1])
    assert explained.columns["reads"][:len(a) + len(b) + 3] == (["<cls>"] + pieces(tokenizer, a) + ["<sep>"]
                                                              + pieces(tokenizer, b) + ["<sep>"])
    assert explained.columns["target"][0] == "random" and explained.notes[0].startswith("label 1, random:")
    # one row alone has no other document: the real B, no label, said so
    with pytest.warns(UserWarning, match="one document"):
        alone = batch_of(objective, pair_rows(tokenizer, [(FIRST, SECOND)]), seed_drawing(True))
    explained = objective.explain(alone, tokenizer)
    assert int(alone["labels"][0]) == IGNORE
    assert explained.columns["target"] == [DASH] * T
    assert explained.notes[0].startswith("no label")


# ---------------------------------------------------------------------------------------- simcse
def framed(tokenizer, texts):
    """Texts as the sentence sources frame them (their own frame_sentences): (ids (N, T), lengths (N,))."""
    encoded = [tokenizer.encode(text) for text in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in encoded])
    return frame_sentences(ids, torch.tensor([len(row) for row in encoded]), T)


def view_grids(objective, batch) -> list[torch.Tensor]:
    """The padding mask forward gives each view of row 0, as (T, T) grids (the pass is view-major)."""
    [used] = masks_forward_uses(objective, batch)
    B = batch["input_ids"].shape[0]
    return [used[v * B, 0].expand(T, T) for v in range(batch["input_ids"].shape[1])]


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_simcse_explanation_is_two_views_of_the_same_ids(pooling, tokenizer):
    objective = tiny("simcse", tokenizer, dropout=0.1, simcse_pooling=pooling)
    ids, lengths = framed(tokenizer, [FIRST])
    batch = objective.make_batch({"input_ids": ids, "lengths": lengths})
    explained = objective.explain(batch, tokenizer)
    check_shape(explained, T)
    n = int(lengths[0])
    assert explained.columns["reads"] == explained.columns["view 2 reads"] == pieces(tokenizer, ids[0])
    assert explained.columns["reads"][:n] == ["<cls>"] + pieces(tokenizer, tokenizer.encode(FIRST)) + ["<sep>"]
    # the sentence vector: [CLS] alone, or the mean over exactly the real tokens, [CLS] and [SEP] included
    pooled = [0] if pooling == "first" else list(range(n))
    assert [t for t, p in enumerate(explained.columns["pooled"]) if p != DASH] == pooled
    assert [t for t, p in enumerate(explained.columns["target"]) if p != DASH] == pooled
    assert {explained.columns["target"][t] for t in pooled} == {"its view 2"}
    assert list(explained.masks) == ["padding, view 1", "padding, view 2"]
    for (queries, keys, grid), used in zip(explained.masks.values(), view_grids(objective, batch)):
        assert queries == keys == explained.columns["reads"]
        assert torch.equal(grid, used) and grid[:, :n].all() and not grid[:, n:].any()
    assert "dropout (p = 0.1)" in explained.notes[0] and "differ" in explained.notes[0]


def test_simcse_without_dropout_says_the_views_coincide(tokenizer):
    objective = tiny("simcse", tokenizer, dropout=0.0)
    ids, lengths = framed(tokenizer, [FIRST])
    explained = objective.explain(objective.make_batch({"input_ids": ids, "lengths": lengths}), tokenizer)
    assert "--dropout 0" in explained.notes[0] and "one vector" in explained.notes[0]


@pytest.mark.parametrize("has_negative", [True, False])
def test_simcse_sup_shows_anchor_positive_and_hard_negative_rows(has_negative, tokenizer):
    """A hand-built (anchor, positive, hard negative) row of three lengths: each view's pieces and
    its own padding mask, as forward hands them to the encoder."""
    objective = tiny("simcse_sup", tokenizer)
    texts = [FIRST, SECOND, "Dogs bark at night." if has_negative else ""]
    ids, lengths = framed(tokenizer, texts)
    raw = {"input_ids": ids[None], "lengths": lengths[None], "has_negative": (lengths[None, 2] > 2)}
    batch = objective.make_batch(raw)
    explained = objective.explain(batch, tokenizer)
    check_shape(explained, T)
    assert explained.columns["reads"] == pieces(tokenizer, ids[0])
    assert explained.columns["positive reads"] == pieces(tokenizer, ids[1])
    assert explained.columns["hard negative reads"] == pieces(tokenizer, ids[2])
    assert explained.columns["target"][0] == "its positive" and set(explained.columns["target"][1:]) == {DASH}
    assert list(explained.masks) == ["padding, anchor", "padding, positive", "padding, hard negative"]
    for v, ((queries, keys, grid), used) in enumerate(zip(explained.masks.values(), view_grids(objective, batch))):
        assert queries == keys == pieces(tokenizer, ids[v])
        assert torch.equal(grid, used) and int(grid[0].sum()) == int(lengths[v])
    said = "one more candidate" if has_negative else "no hard negative"
    assert any(said in note for note in explained.notes)


# ---------------------------------------------------------------------------------------- classify
LABELS = ["negative", "positive"]


@pytest.mark.parametrize("attention, pooling", [("bidirectional", "first"), ("bidirectional", "mean"),
                                                ("causal", "last")])
def test_classify_explanation_is_its_batch_with_the_label_at_the_pooled_positions(attention, pooling, tokenizer):
    """Row 0 shorter than row 1, so make_batch's cut leaves it padding: the label sits where the head's
    vector is pooled from, and the mask is the one logits() gives the backbone."""
    objective = tiny("classify", tokenizer, labels=json.dumps(LABELS), classifier_attention=attention,
                     pooling=pooling)
    ids, lengths = framed(tokenizer, [SECOND, FIRST])
    raw = {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([1, 0]),
           "row_valid": torch.tensor([True, True]), "rows": torch.tensor([0, 1])}
    batch = objective.make_batch(raw)
    explained = objective.explain(batch, tokenizer)
    cut, n = batch["input_ids"].shape[1], int(lengths[0])
    assert cut == int(lengths[1]) > n
    check_shape(explained, cut)
    assert explained.columns["reads"] == pieces(tokenizer, ids[0, :cut])
    assert explained.columns["reads"][:n] == ["<cls>"] + pieces(tokenizer, tokenizer.encode(SECOND)) + ["<sep>"]
    pooled = {"first": [0], "mean": list(range(n)), "last": [n - 1]}[pooling]
    assert [t for t, p in enumerate(explained.columns["pooled"]) if p != DASH] == pooled
    assert explained.columns["target"] == ["positive" if t in pooled else DASH for t in range(cut)]
    assert explained.notes[0].startswith("label 1, positive:")
    [used] = masks_forward_uses(objective, batch)
    [(title, (queries, keys, grid))] = explained.masks.items()
    assert queries == keys == explained.columns["reads"]
    if attention == "causal":
        assert used == "causal" and title == "causal" and torch.equal(grid, causal_mask(cut))
    else:
        assert torch.equal(grid, as_grid(used, cut)) and grid[:, :n].all() and not grid[:, n:].any()


def test_classify_padding_row_has_no_label(tokenizer):
    objective = tiny("classify", tokenizer, labels=json.dumps(LABELS))
    ids, lengths = framed(tokenizer, [FIRST])
    raw = {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([0]), "row_valid": torch.tensor([False]),
           "rows": torch.tensor([-1])}
    explained = objective.explain(objective.make_batch(raw), tokenizer)
    assert set(explained.columns["target"]) == {DASH} and explained.notes[0].startswith("an evaluation padding row")


# ---------------------------------------------------------------------------------------- a+b
def test_a_plus_b_puts_each_parts_explanation_of_its_own_batch_side_by_side(tokenizer):
    """mlm+sop on a hand-built pair, with a seed at which sop swaps it: each part's columns, masks
    and notes are its own explanation of its own batch, under its name; mlm reads the pair in
    document order while sop reads it swapped."""
    objective = tiny("mlm+sop", tokenizer, objective_weights="1,0.5")
    raw = pair_rows(tokenizer, [(FIRST, SECOND)])
    batch = next(b for b in (batch_of(objective, raw, seed) for seed in range(100)) if int(b["sop"]["labels"][0]) == 1)
    explained = objective.explain(batch, tokenizer)
    for name, part in objective.parts.items():
        own = part.explain(batch[name], tokenizer)
        assert {title: values for title, values in explained.columns.items() if title.startswith(name + "/")} \
            == {f"{name}/{title}": values for title, values in own.columns.items()}
        for title, (queries, keys, grid) in own.masks.items():
            got = explained.masks[f"{name}: {title}"]
            assert got[:2] == (queries, keys) and torch.equal(got[2], grid)
        assert [note for note in explained.notes if note.startswith(name + ": ")] == [f"{name}: {n}" for n in own.notes]
    assert len(explained.masks) == sum(len(part.explain(batch[name], tokenizer).masks)
                                       for name, part in objective.parts.items())
    assert explained.notes[0] == "one backbone, one pass per part over its own batch; the loss is 1 * mlm + 0.5 * sop"
    a, b = tokenizer.encode(FIRST), tokenizer.encode(SECOND)
    swapped = ["<cls>"] + pieces(tokenizer, b) + ["<sep>"] + pieces(tokenizer, a) + ["<sep>"]
    assert explained.columns["sop/reads"][:len(swapped)] == swapped
    assert explained.columns["sop/target"][0] == "swapped"
    assert explained.columns["mlm/reads"] == pieces(tokenizer, batch["mlm"]["input_ids"][0])
    # mlm reads the pair as the source made it, A first (bar its masked tokens): most of its text
    # positions hold the source's token there, where the swapped row differs
    n = len(a) + len(b) + 3
    as_made = (batch["mlm"]["input_ids"][0] == raw["input_ids"][0])[1:n - 1]
    as_swapped = (batch["sop"]["input_ids"][0] == raw["input_ids"][0])[1:n - 1]
    assert as_made.float().mean() > 0.6 > as_swapped.float().mean()
    # sop's mask is the one its forward gives the shared backbone (the second pass: mlm's runs first)
    used = masks_forward_uses(objective, batch)
    assert len(used) == 2
    assert torch.equal(explained.masks["sop: padding (encoder, both ways)"][2], as_grid(used[1], T))
