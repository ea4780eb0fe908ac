"""Sentence splitting, the segment-pair source and sentence-order prediction (ALBERT), with the
NSP option. The corpus is made of numbered sentences ("Sentence 4 of document 17.") so every
sentence, pair and swap can be checked against where its text really came from."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from minilm.config import ModelConfig, ObjectiveConfig
from minilm.data import (SegmentPairSource, make_source, prepare, split_sentences,
                         truncate_longest_first)
from minilm.errors import UserError
from minilm.model import padding_mask
from minilm.objectives import build_objective
from minilm.tokenizer import CLS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer

NUMBERED = re.compile(r"Sentence (\d+) of document (\d+)")
QUIET = dict(log=lambda *_: None)
T_PAIRS = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def numbered_documents(n_docs: int = 240, seed: int = 0) -> list[str]:
    """Documents whose sentences say where they are. Sentence ends vary (. ! ? a stop inside
    quotes or brackets, a heading without a stop before a blank line) and sentences may hold
    dots that end nothing (3.14, os.path, "e.g. this"), so a splitter that cuts anywhere else
    leaves zero or two numbers in some sentence. About a quarter of the documents have one
    sentence."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        n = rng.choice([1, 1, 2, 2, 3, 4, 6, 9])
        text = ""
        for i in range(n):
            core = f"Sentence {i} of document {d}"
            sentence = rng.choice([core + ".", core + "!", core + "?", f'"{core}."', f"({core}.)",
                                   core + " cites os.path and 3.14, e.g. this one.", core + "\n\n"])
            text += sentence + ("" if sentence.endswith("\n") else rng.choice([" ", "  ", "\n", "\n\n"]))
        docs.append(text)
    return docs


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """(documents, tokenizer, prepared folder) for the numbered corpus."""
    docs = numbered_documents()
    folder = tmp_path_factory.mktemp("numbered")
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tokenizer = Tokenizer.train(docs, vocab_size=420)
    out = str(folder / "prepared")
    prepare(str(folder / "corpus.jsonl"), tokenizer, out, val_fraction=0.1, num_workers=1, **QUIET)
    return docs, tokenizer, out


def train_documents(tokenizer, folder) -> list[str]:
    """The texts of the train split's documents, read back from the token file."""
    tokens = np.fromfile(f"{folder}/train.bin", dtype=np.uint16)
    ends = np.flatnonzero(tokens == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


def numbers(text: str) -> list[tuple[int, int]]:
    """[(document, sentence), ...] named in a text, in order."""
    return [(int(d), int(i)) for i, d in NUMBERED.findall(text)]


def segments(tokenizer, ids: torch.Tensor, length: int):
    """The two segments of `[CLS] X [SEP] Y [SEP] [PAD]...` as token lists, checking the frame."""
    ids = ids.tolist()
    assert ids[0] == CLS_ID and ids[length - 1] == SEP_ID
    assert all(t == PAD_ID for t in ids[length:])
    seps = [i for i, t in enumerate(ids[:length]) if t == SEP_ID]
    assert len(seps) == 2 and seps[1] == length - 1
    return ids[1:seps[0]], ids[seps[0] + 1:length - 1]


def is_run(pairs) -> bool:
    """One document, sentence numbers increasing by exactly one."""
    return (len(pairs) >= 2 and len({d for d, _ in pairs}) == 1
            and all(b[1] == a[1] + 1 for a, b in zip(pairs, pairs[1:])))


# ----------------------------------------------------------------------------- tokenizer tables
def test_sentence_tables_of_the_tokenizer(tokenizer):
    piece = tokenizer.sp.piece_to_id
    for p in (".", "!", '".', ")."):
        assert tokenizer.ends_stop_table[piece(p)], p
    for p in ("▁the", ",", ".__", "▁("):
        assert not tokenizer.ends_stop_table[piece(p)], p
    assert tokenizer.closer_table[piece('"')] and tokenizer.closer_table[piece(")")]
    assert not tokenizer.closer_table[piece("▁(")] and not tokenizer.closer_table[piece(".")]
    newline = piece("<0x0A>")
    assert tokenizer.whitespace_table[newline] and tokenizer.newline_table[newline]
    assert tokenizer.whitespace_table[piece("▁")] and not tokenizer.whitespace_table[piece("▁the")]
    assert tokenizer.starts_lower_table[piece("▁the")] and not tokenizer.starts_lower_table[piece("▁The")]
    assert not tokenizer.ends_stop_table[:7].any()   # specials end nothing


# ----------------------------------------------------------------------------- splitting
def test_split_sentences_finds_every_numbered_sentence(numbered):
    _, tokenizer, folder = numbered
    tokens = np.memmap(f"{folder}/train.bin", dtype=np.uint16, mode="r")
    starts, ends, documents = split_sentences(tokens, tokenizer)
    named = [numbers(tokenizer.decode(tokens[a:b].tolist())) for a, b in zip(starts, ends)]
    assert all(len(n) == 1 for n in named), [n for n in named if len(n) != 1][:5]
    named = [n[0] for n in named]
    # every document's sentences, complete and in order: 0, 1, 2, ... of one document
    for doc in np.unique(documents):
        ours = [named[i] for i in np.flatnonzero(documents == doc)]
        assert [i for _, i in ours] == list(range(len(ours))) and len({d for d, _ in ours}) == 1
    assert len(starts) == sum(len(numbers(t)) for t in train_documents(tokenizer, folder))
    # sentences tile each document and never contain <eos>
    assert np.all(ends > starts) and np.all(ends[:-1] <= starts[1:])
    assert not any((tokens[a:b] == EOS_ID).any() for a, b in zip(starts, ends))
    # chunked scanning (the memmap in pieces of 61 tokens) finds exactly the same sentences
    for got, want in zip(split_sentences(tokens, tokenizer, chunk=61), (starts, ends, documents)):
        assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- pairs and labels
@pytest.fixture(scope="module")
def ten_thousand(numbered):
    """1e4 SOP rows: the source's raw batch and the objective's batch. seq_len 128 holds any two
    whole sentences of this corpus, so no row is truncated and every segment names its sentences."""
    _, tokenizer, folder = numbered
    source = SegmentPairSource(folder, "train", T_PAIRS, 10_000, seed=1, **QUIET)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=T_PAIRS, n_layer=1, n_head=2, n_embd=32)
    sop = build_objective("sop", cfg, tokenizer)
    raw = source.batch(0)
    return source, raw, sop.make_batch(raw, torch.Generator().manual_seed(0))


def test_sop_labels_are_balanced_and_pairs_are_consecutive_runs(numbered, ten_thousand):
    _, tokenizer, folder = numbered
    _, raw, batch = ten_thousand
    labels = batch["labels"]
    assert len(labels) == 10_000
    assert abs(labels.float().mean().item() - 0.5) < 0.02
    single = {numbers(t)[0][0] for t in train_documents(tokenizer, folder) if len(numbers(t)) == 1}
    for row in range(10_000):
        length = int(batch["lengths"][row])
        x, y = segments(tokenizer, batch["input_ids"][row], length)
        seg = batch["segment_ids"][row].tolist()
        assert seg == [0] * (len(x) + 2) + [1] * (len(y) + 1) + [0] * (T_PAIRS - length)
        first, second = numbers(tokenizer.decode(x)), numbers(tokenizer.decode(y))
        if labels[row] == 0:
            assert is_run(first + second), (first, second)       # A then B: in document order
        else:
            assert is_run(second + first), (first, second)       # B then A: swapped
            assert not is_run(first + second)
        assert first[0][0] not in single                          # one document, never a lone sentence
    # in order, the raw rows are what the unswapped rows of the batch are
    keep = labels == 0
    assert torch.equal(batch["input_ids"][keep], raw["input_ids"][keep])
    assert torch.equal(batch["segment_ids"][keep], raw["segment_ids"][keep])


def test_a_swapped_pair_is_the_two_segments_reversed(ten_thousand):
    _, raw, batch = ten_thousand
    swapped = torch.nonzero(batch["labels"] == 1).squeeze(1)
    assert len(swapped) > 4000
    for row in swapped[:500].tolist():
        a, b = int(raw["a_lengths"][row]), int(raw["b_lengths"][row])
        before, after = raw["input_ids"][row], batch["input_ids"][row]
        A, B = before[1:1 + a], before[2 + a:2 + a + b]
        want = torch.cat([torch.tensor([CLS_ID]), B, torch.tensor([SEP_ID]), A, torch.tensor([SEP_ID])])
        assert torch.equal(after[:a + b + 3], want)
        assert torch.equal(after[a + b + 3:], before[a + b + 3:])           # padding untouched
        assert batch["segment_ids"][row, :a + b + 3].tolist() == [0] * (b + 2) + [1] * (a + 1)
        assert batch["lengths"][row] == raw["lengths"][row]


def test_single_sentence_documents_are_skipped_and_counted(numbered, tmp_path):
    docs, tokenizer, folder = numbered
    train_docs = train_documents(tokenizer, folder)
    source = SegmentPairSource(folder, "train", 64, 8, **QUIET)
    lone = [t for t in train_docs if len(numbers(t)) == 1]
    assert len(lone) > 20 and source.skipped_documents == len(lone)
    assert source.skipped_tokens == sum(len(tokenizer.encode(t)) for t in lone)
    lines = []
    SegmentPairSource(folder, "train", 64, 8, log=lines.append)
    assert len(lines) == 1 and f"{len(lone)} single-sentence documents skipped" in lines[0]
    # a corpus with no document of two sentences makes no pairs: one clear error
    lone_corpus = "\n".join(json.dumps({"text": f"Just one sentence here {i}."}) for i in range(30))
    (tmp_path / "lone.jsonl").write_text(lone_corpus)
    prepare(str(tmp_path / "lone.jsonl"), tokenizer, str(tmp_path / "p"), num_workers=1, **QUIET)
    with pytest.raises(UserError, match="no document with two sentences"):
        SegmentPairSource(str(tmp_path / "p"), "train", 64, 8, **QUIET)
    with pytest.raises(UserError, match="seq_len"):
        SegmentPairSource(folder, "train", 4, 8, **QUIET)


def test_long_pairs_are_truncated_longest_first_keeping_the_junction(numbered):
    docs, tokenizer, folder = numbered
    source = SegmentPairSource(folder, "train", 20, 400, seed=2, **QUIET)   # ~14 tokens a sentence
    raw = source.batch(0)
    a, b = raw["a_lengths"], raw["b_lengths"]
    assert torch.all(raw["lengths"] <= 20) and torch.all(a >= 1) and torch.all(b >= 1)
    assert (a + b == 17).float().mean() > 0.9             # almost every row needed cutting
    assert torch.all((a - b).abs() <= 1)                  # longest-first leaves them even
    for row in range(400):
        x, y = segments(tokenizer, raw["input_ids"][row], int(raw["lengths"][row]))
        # B still starts a sentence (it loses its end) and A still ends right before it (A loses
        # its front): A + B is a stretch of one document's text, across a sentence boundary
        assert tokenizer.decode(y).lstrip(' "(').startswith("Sentence"), tokenizer.decode(y)
        joined = tokenizer.decode(x + y)
        assert any(joined in doc for doc in docs), joined
    # the closed form equals ALBERT's one-token-at-a-time loop
    rng = np.random.default_rng(0)
    la, lb = rng.integers(1, 60, 2000), rng.integers(1, 60, 2000)
    got_a, got_b = truncate_longest_first(la, lb, 40)
    for i in range(2000):
        x, y = int(la[i]), int(lb[i])
        while x + y > 40:
            if x > y:
                x -= 1
            else:
                y -= 1
        assert (got_a[i], got_b[i]) == (x, y)


def test_batches_are_a_pure_function_of_seed_step_and_micro(numbered):
    _, _, folder = numbered
    one = make_source("segment_pairs", folder, "train", 48, 16, seed=3, log=None)
    two = SegmentPairSource(folder, "train", 48, 16, seed=3, **QUIET)
    for key, value in one.batch(5, 1).items():
        assert torch.equal(value, two.batch(5, 1)[key]), key
    # whatever was drawn before: a fresh source that draws steps 3 and 5 first gives the same step 5
    want = SegmentPairSource(folder, "train", 48, 16, seed=3, **QUIET).batch(5, 1)
    source = SegmentPairSource(folder, "train", 48, 16, seed=3, **QUIET)
    source.batch(3, 1)
    for _ in range(2):                                      # after step 3, then after step 5 itself
        for key, value in source.batch(5, 1).items():
            assert torch.equal(value, want[key]), key
    other_seed = SegmentPairSource(folder, "train", 48, 16, seed=4, **QUIET)
    others = [one.batch(6, 1), one.batch(5, 0), other_seed.batch(5, 1)]
    for other in others:
        assert not torch.equal(other["input_ids"], one.batch(5, 1)["input_ids"])
    # the objective's swaps are a pure function of the generator too
    sop = build_objective("sop", ModelConfig(vocab_size=420, seq_len=48, n_layer=1, n_head=2, n_embd=32))
    raw = one.batch(0)
    first, again = (sop.make_batch(raw, torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])


# ----------------------------------------------------------------------------- the model side
@torch.no_grad()
def test_encoder_ignores_padding_of_segment_pairs(numbered):
    _, tokenizer, folder = numbered
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    sop = build_objective("sop", cfg, tokenizer).eval()
    raw = SegmentPairSource(folder, "train", 64, 16, **QUIET).batch(0)
    batch = sop.make_batch(raw, torch.Generator().manual_seed(0))
    real = batch["input_ids"] != PAD_ID
    assert (~real).any(dim=1).sum() >= 8                  # most rows are padded
    noisy = dict(batch)
    noisy["input_ids"] = torch.where(real, batch["input_ids"], torch.randint(7, 400, real.shape))
    noisy["segment_ids"] = torch.where(real, batch["segment_ids"], 1)
    mask = padding_mask(batch["lengths"], 64)

    def hidden(b):
        return sop.backbone(b["input_ids"], mask=mask, segment_ids=b["segment_ids"])
    torch.testing.assert_close(hidden(noisy)[real], hidden(batch)[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(sop(noisy)[0], sop(batch)[0], atol=1e-6, rtol=0)
    # without the mask the pads do leak in: the check above can fail
    leak = sop.backbone(noisy["input_ids"], mask=None, segment_ids=noisy["segment_ids"])[real]
    assert (leak - hidden(batch)[real]).abs().max() > 1e-3


def test_sop_head_on_the_pooled_output_and_its_loss(numbered):
    _, tokenizer, folder = numbered
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=32)
    sop = build_objective("sop", cfg, tokenizer)
    assert sop.backbone.cfg.n_segment == 2 and cfg.n_segment == 0    # pairs bring segment embeddings
    raw = SegmentPairSource(folder, "train", 64, 32, **QUIET).batch(0)
    batch = sop.make_batch(raw, torch.Generator().manual_seed(0))
    loss, sums = sop(batch)
    hidden = sop.backbone(batch["input_ids"], mask=padding_mask(batch["lengths"], 64),
                          segment_ids=batch["segment_ids"])
    logits = sop.head(torch.tanh(sop.pooler.dense(hidden[:, 0])))
    want = torch.nn.functional.cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(loss, want)
    assert int(sums["targets"]) == 32 and int(sums["correct"]) == int((logits.argmax(-1) == batch["labels"]).sum())
    # with step-wide totals the loss is the summed loss over the step's rows
    torch.testing.assert_close(sop(batch, {"targets": torch.tensor(64)})[0], want / 2)
    with pytest.raises(UserError, match="sentence_task"):
        build_objective("sop", cfg, tokenizer, ObjectiveConfig(sentence_task="nextsent"))


def test_nsp_option_takes_b_from_another_document(numbered):
    _, tokenizer, folder = numbered
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=32)
    nsp = build_objective("sop", cfg, tokenizer, ObjectiveConfig(sentence_task="nsp"))
    source = SegmentPairSource(folder, "train", 64, 50, seed=5, **QUIET)
    labels = []
    for step in range(60):
        raw = source.batch(step)
        batch = nsp.make_batch(raw, torch.Generator().manual_seed(step))
        labels.append(batch["labels"])
        b_of = [raw["input_ids"][j, 2 + int(raw["a_lengths"][j]):int(raw["lengths"][j]) - 1].tolist()
                for j in range(50)]                             # each row's own B
        for row in range(50):
            length = int(batch["lengths"][row])
            assert length <= 64
            x, y = segments(tokenizer, batch["input_ids"][row], length)
            assert x == raw["input_ids"][row, 1:1 + int(raw["a_lengths"][row])].tolist()   # A is always kept
            if batch["labels"][row] == 0:
                assert torch.equal(batch["input_ids"][row], raw["input_ids"][row])
            else:  # B is the start of another row's B, from another document, cut to fit
                donors = [j for j in range(50) if b_of[j][:len(y)] == y and len(y) >= 1
                          and raw["documents"][j] != raw["documents"][row]]
                assert any(len(y) == len(b_of[j]) or length == 64 for j in donors)   # cut only to fit
    assert abs(torch.cat(labels).float().mean().item() - 0.5) < 0.03   # 3000 rows: 3.3 sigma


def test_sop_learns_the_order_of_held_out_documents(numbered, tmp_path):
    """A tiny encoder trained on SOP alone tells swapped from ordered pairs of documents it never
    saw well above chance (0.5) in 300 steps (about 13 s on one CPU thread)."""
    from minilm.config import Config
    from minilm.trainer import Trainer
    _, tokenizer, folder = numbered
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=48, n_layer=2, n_head=2, n_embd=64)
    cfg.train.objective = "sop"
    for k, v in dict(out_dir=str(tmp_path), batch_size=32, device="cpu", log_every=100, eval_every=10_000,
                     ckpt_every=10_000, warmup_steps=10, eval_batches=8, max_steps=300, lr=3e-3).items():
        setattr(cfg.train, k, v)
    torch.manual_seed(0)
    objective = build_objective("sop", cfg.model, tokenizer, cfg.obj)
    train = SegmentPairSource(folder, "train", 48, 32, seed=1, **QUIET)
    val = SegmentPairSource(folder, "val", 48, 32, **QUIET)
    trainer = Trainer(cfg, objective, train, val, tokenizer, log=lambda *_: None)
    start = trainer.evaluate()
    trainer.fit()
    end = trainer.last_eval
    assert abs(start["acc"] - 0.5) < 0.15 and start["loss"] > 0.6   # chance at the start: ln 2 = 0.69
    assert end["acc"] > 0.75 and end["loss"] < 0.5, (start, end)
