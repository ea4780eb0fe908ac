"""Objective.explain for the masked LMs (mlm, wwm, span, tlm) and replaced-token detection (rtd):
the explanation is the batch (reads and target decoded from make_batch's tensors, the choice from
its own record), the masks are the ones forward hands the encoders, and hand-built rows whose
choices are known (a random replacement that drew the original is still "random", wwm's words are
the sentence's words, span's spans stop at a document boundary, tlm's positions restart at the
translation, ELECTRA labels a sample equal to the original as original)."""
from __future__ import annotations

import pytest
import torch

from minilm.config import ModelConfig
from minilm.data import pack_translation
from minilm.explain import DASH, pieces, targets
from minilm.losses import IGNORE
from minilm.objectives import build_objective, objective_class
from minilm.explain import mask_grid
from minilm.tokenizer import EOS_ID, MASK_ID, PAD_ID

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TEXT = ("The unbelievable cat sat quietly on the riverbank, watching the boats go by while "
        "the evening light slowly faded over the water.")


def make(name, tokenizer, seq_len, **options):
    """A tiny untrained `name` with its own Options (defaults but for `options`)."""
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=seq_len, n_layer=1, n_head=2, n_embd=32)
    return build_objective(name, cfg, tokenizer, objective_class(name).Options(**options))


def one_row(tokenizer, seq_len, text=TEXT):
    """The sentence's ids as one "blocks" row of seq_len + 1 tokens (the last is never read)."""
    ids = tokenizer.encode(text)
    assert len(ids) > seq_len
    return torch.tensor([ids[:seq_len + 1]])


def padded_row(tokenizer, seq_len, n):
    """The sentence's first n ids right-padded to seq_len + 1, and its length (1,)."""
    ids = tokenizer.encode(TEXT)[:n]
    return torch.tensor([ids + [PAD_ID] * (seq_len + 1 - n)]), torch.tensor([n])


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def masks_forward_passes(objective, batch):
    """Run forward on `batch` and capture, per encoder (the backbone; rtd's generator too), the ids
    it read and the attention mask it was handed."""
    seen = {}

    def capture(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0].clone(), kwargs.get("mask"))
        return hook

    encoders = {"discriminator" if hasattr(objective, "generator") else "encoder": objective.backbone}
    if hasattr(objective, "generator"):
        encoders["generator"] = objective.generator
    handles = [module.register_forward_pre_hook(capture(name), with_kwargs=True) for name, module in encoders.items()]
    try:
        objective(batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ----------------------------------------------------------------------------- the explanation is the batch
@pytest.mark.parametrize("name", ["mlm", "wwm", "span"])
@pytest.mark.parametrize("padded", [False, True])
def test_masked_lm_rows_are_the_batch(tokenizer, name, padded):
    """reads and target are the batch's input_ids and labels decoded; choice is make_batch's own
    record (shown_as), consistent with the tensors: <mask> read where masked, the original where
    unchanged, nothing chosen at a pad; the one mask is what forward hands the encoder."""
    T = 24
    objective = make(name, tokenizer, T, mask_prob=0.4)
    raw, lengths = padded_row(tokenizer, T, 17) if padded else (one_row(tokenizer, T), None)
    batch = objective.make_batch(raw, seeded(1), lengths=lengths)
    explained = objective.explain(batch, tokenizer)

    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert list(explained.columns)[:3] == ["reads", "target", "choice"]
    assert explained.columns["reads"] == pieces(tokenizer, ids)
    assert explained.columns["target"] == targets(tokenizer, labels, IGNORE)
    choice = explained.columns["choice"]
    assert all((c == DASH) == (int(label) == IGNORE) for c, label in zip(choice, labels))
    assert choice.count("masked") + choice.count("random") + choice.count("unchanged") == int(batch["counts"]["targets"]) > 0
    for t, c in enumerate(choice):
        if c == "masked":
            assert ids[t] == MASK_ID
        if c == "unchanged":
            assert ids[t] == labels[t]
    if padded:
        assert all(c == DASH for c in choice[17:])

    (title, (queries, keys, grid)), = explained.masks.items()
    assert queries == keys == explained.columns["reads"] and grid.shape == (T, T)
    (_, mask), = masks_forward_passes(objective, batch).values()
    assert torch.equal(grid, mask_grid(mask, T, T))
    if padded:   # every query sees exactly the real keys
        assert "padding" in title and grid[:, :17].all() and not grid[:, 17:].any()
    else:        # an encoder: every position sees every other, no causal mask
        assert mask is None and grid.all() and "bidirectional" in title


def test_the_same_seed_explains_the_same_row(tokenizer):
    """make_batch with the seed's generator fixes the explanation."""
    objective = make("span", tokenizer, 24, mask_prob=0.3)
    raw = one_row(tokenizer, 24)
    first, again = (objective.explain(objective.make_batch(raw, seeded(7)), tokenizer) for _ in range(2))
    assert first.columns == again.columns and first.notes == again.notes


# ----------------------------------------------------------------------------- hand-built rows
def test_a_random_replacement_that_drew_the_original_is_still_random(tokenizer):
    """Every eligible token chosen and shown as a random token drawn from one id, the row's first:
    where the original is that id the input equals the original, which the tensors alone would call
    unchanged; the record says random."""
    T = 16
    objective = make("mlm", tokenizer, T, mask_prob=1.0, mask_replace_prob=0.0, random_replace_prob=1.0)
    raw = one_row(tokenizer, T)
    only = raw[0, 0]
    objective.random_ids = only[None].clone()   # the one id a random replacement may draw
    explained = objective.explain(objective.make_batch(raw, seeded()), tokenizer)
    assert explained.columns["choice"] == ["random"] * T
    assert explained.columns["reads"] == [tokenizer.id_to_piece(int(only))] * T
    same = [t for t in range(T) if raw[0, t] == only]
    assert same and all(explained.columns["reads"][t] == explained.columns["target"][t] for t in same)
    assert explained.notes[0] == f"{T} of {T} eligible tokens chosen: 0 masked, {T} random, 0 unchanged"

    objective = make("mlm", tokenizer, T, mask_prob=1.0, mask_replace_prob=0.0, random_replace_prob=0.0)
    explained = objective.explain(objective.make_batch(raw, seeded()), tokenizer)
    assert explained.columns["choice"] == ["unchanged"] * T
    assert explained.columns["reads"] == explained.columns["target"] == pieces(tokenizer, raw[0, :T])


def test_whole_word_masking_names_the_sentences_words(tokenizer):
    """With every token to predict, wwm chooses every word: the word column groups each word's
    pieces (one label per word, in order) and the notes spell the sentence's words."""
    text = "the unbelievable riverbank watching quietly"
    ids = tokenizer.encode(text)
    T = len(ids)
    assert T > len(text.split())   # some word is more than one piece
    objective = make("wwm", tokenizer, T, mask_prob=1.0, mask_replace_prob=1.0, random_replace_prob=0.0)
    explained = objective.explain(objective.make_batch(torch.tensor([ids + [EOS_ID]]), seeded()), tokenizer)
    words = [note.split(": ", 1)[1].strip("'\" ") for note in explained.notes[1:]]
    assert words == text.split()
    column = explained.columns["word"]
    assert len(set(column)) == len(words)
    starts = [t for t in range(T) if t == 0 or column[t] != column[t - 1]]
    assert [tokenizer.decode(ids[a:b]).strip() for a, b in zip(starts, starts[1:] + [T])] == text.split()
    assert column[0].startswith("1 (0-") and explained.columns["reads"] == [tokenizer.id_to_piece(MASK_ID)] * T


def test_spans_stop_at_a_document_boundary(tokenizer):
    """Two documents in one window, every token to predict: span covers each document with one
    merged span, the <eos> between them is neither chosen nor in a span."""
    first, second = tokenizer.encode("the cat sat on the mat"), tokenizer.encode("boats go by")
    ids = first + [EOS_ID] + second
    T = len(ids)
    objective = make("span", tokenizer, T, mask_prob=1.0)
    explained = objective.explain(objective.make_batch(torch.tensor([ids + [EOS_ID]]), seeded()), tokenizer)
    a, b = len(first), len(first) + 1
    span = explained.columns["span"]
    assert span == [f"1 (0-{a - 1})"] * a + [DASH] + [f"2 ({b}-{T - 1})"] * len(second)
    assert explained.columns["choice"][a] == DASH and explained.columns["reads"][a] == tokenizer.id_to_piece(EOS_ID)
    # span masking draws one 80/10/10 choice per merged span
    assert len(set(explained.columns["choice"][:a])) == len(set(explained.columns["choice"][b:])) == 1
    assert [note.split(": ", 1)[1].strip("'\" ") for note in explained.notes[1:]] == ["the cat sat on the mat", "boats go by"]


def test_translation_rows_name_languages_and_restarted_positions(tokenizer):
    """tlm's row <eos> S <eos> <eos> T <eos> <pad>...: the source half, then the target half from
    its opening <eos>, positions restarting at 0 there; pads hidden from every query."""
    source, target = tokenizer.encode("the cat sleeps"), tokenizer.encode("le chat dort")
    a, b, T = len(source), len(target), 20
    raw = pack_translation(torch.tensor([source]), torch.tensor([a]), torch.tensor([target]), torch.tensor([b]), T)
    objective = make("tlm", tokenizer, T, mask_prob=0.5)
    batch = objective.make_batch(raw, seeded())
    explained = objective.explain(batch, tokenizer)
    n = a + b + 4
    assert explained.columns["reads"] == pieces(tokenizer, batch["input_ids"][0])
    assert explained.columns["language"][:n] == ["source"] * (a + 2) + ["target"] * (b + 2)
    assert explained.columns["position"][:n] == [str(p) for p in list(range(a + 2)) + list(range(b + 2))]
    assert f"positions restart at 0 where the translation begins (position {a + 2})" in explained.notes
    assert all(c == DASH for c in explained.columns["choice"][n:])
    (_, (_, _, grid)), = explained.masks.items()
    (_, mask), = masks_forward_passes(objective, batch).values()
    assert torch.equal(grid, mask_grid(mask, T, T)) and grid[:, :n].all() and not grid[:, n:].any()


# ----------------------------------------------------------------------------- rtd
@pytest.mark.parametrize("padded", [False, True])
def test_rtd_reads_what_the_discriminator_reads(tokenizer, padded):
    """The generator reads masked_ids; "reads" is the discriminator's input in forward (the
    generator's samples at the chosen positions, make_batch's noise), the label is forward's
    corrupted != original, the masks are the ones both encoders receive."""
    T = 20
    objective = make("rtd", tokenizer, T, mask_prob=0.5)
    raw, lengths = padded_row(tokenizer, T, 14) if padded else (one_row(tokenizer, T), None)
    batch = objective.make_batch(raw, seeded(3), lengths=lengths)
    explained = objective.explain(batch, tokenizer)
    seen = masks_forward_passes(objective, batch)

    disc_ids, disc_mask = seen["discriminator"]
    gen_ids, gen_mask = seen["generator"]
    columns = explained.columns
    assert list(columns) == ["reads", "target", "generator reads", "sample", "label"]
    assert columns["reads"] == pieces(tokenizer, disc_ids[0])
    assert columns["generator reads"] == pieces(tokenizer, gen_ids[0]) == pieces(tokenizer, batch["masked_ids"][0])
    chosen = torch.zeros(T, dtype=torch.bool)
    chosen[batch["positions"]] = True
    original = batch["input_ids"][0]
    assert columns["target"] == targets(tokenizer, torch.where(chosen, original, IGNORE), IGNORE)
    for t in range(T):
        assert (columns["sample"][t] == DASH) == (not chosen[t])
        if chosen[t]:
            assert columns["sample"][t] == columns["reads"][t]
        else:
            assert columns["reads"][t] == tokenizer.id_to_piece(int(original[t]))
        if not batch["valid"][0, t]:
            assert columns["label"][t] == DASH
        else:
            assert columns["label"][t] == ("replaced" if disc_ids[0, t] != original[t] else "original")
    title = "self-attention, padding masked" if padded else "bidirectional self-attention"
    assert set(explained.masks) == {f"generator {title}", f"discriminator {title}"}
    assert torch.equal(explained.masks[f"generator {title}"][2], mask_grid(gen_mask, T, T))
    assert torch.equal(explained.masks[f"discriminator {title}"][2], mask_grid(disc_mask, T, T))
    if padded:
        assert explained.masks[f"discriminator {title}"][2][:, :14].all()
        assert not explained.masks[f"discriminator {title}"][2][:, 14:].any()


def test_rtd_labels_a_sample_equal_to_the_original_as_original(tokenizer):
    """A row of one repeated token, every token chosen, a generator whose output bias puts all its
    mass on one id: sampling that very token labels every position original (and reads it back);
    sampling another labels every position replaced."""
    T = 12
    word = tokenizer.encode(" the")[-1]
    other = tokenizer.encode(" cat")[-1]
    objective = make("rtd", tokenizer, T, mask_prob=1.0)
    batch = objective.make_batch(torch.full((1, T + 1), word), seeded())
    for sampled, label in ((word, "original"), (other, "replaced")):
        with torch.no_grad():
            objective.generator_head.bias.fill_(-1e4)
            objective.generator_head.bias[sampled] = 1e4
        explained = objective.explain(batch, tokenizer)
        piece = tokenizer.id_to_piece(sampled)
        assert explained.columns["sample"] == explained.columns["reads"] == [piece] * T
        assert explained.columns["label"] == [label] * T
        assert explained.columns["target"] == [tokenizer.id_to_piece(word)] * T
        replaced = T if label == "replaced" else 0
        assert explained.notes[0] == (f"generator sampled at {T} positions: {replaced} replaced, "
                                      f"{T - replaced} drew the original (labelled original)")
