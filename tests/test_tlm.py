"""Translation LM (XLM's TLM): the parallel source's layout (positions restart at the target,
a language id per token, proportional truncation), masking over both halves, mlm+tlm's
monolingual rows, the point of TLM measured on a synthetic language pair, and the command line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minilm.config import DataConfig, ModelConfig
from minilm.data import ParallelSource, make_source, pack_translation, prepare_rows, truncate_in_proportion
from minilm.data.rows import RowTable
from minilm.errors import UserError
from minilm.losses import IGNORE
from minilm.model import padding_mask
from minilm.objectives import build_objective, model_config_for
from minilm.tokenizer import EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID
from tests.conftest import run_in_process
from tests.test_cli import TINY, assert_user_error, run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

QUIET = dict(log=lambda *_: None)
COLUMNS = [("en", "--text_field"), ("fr", "--pair_field")]
SEQ_LEN = 48
WORDS_EN = "the cat dog house red blue big small runs sleeps eats sees a on under river".split()
WORDS_FR = "le chat chien maison rouge bleu grand petit court dort mange voit un sur sous fleuve".split()


def write_pairs(path, n_rows: int = 300, seed: int = 0):
    """A .tsv of word-for-word "translations", a few of them longer than SEQ_LEN tokens, and one
    row with an empty side (skipped by prepare_rows)."""
    rng = np.random.default_rng(seed)
    lines = ["en\tfr"]
    for i in range(n_rows):
        n = int(rng.integers(2, 40 if i % 10 == 0 else 10))
        words = rng.integers(0, len(WORDS_EN), size=n)
        lines.append(" ".join(WORDS_EN[w] for w in words) + "\t" + " ".join(WORDS_FR[w] for w in words))
    lines.append("lonely\t ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory, tokenizer):
    """A prepared parallel folder (rows of en, fr)."""
    folder = tmp_path_factory.mktemp("parallel")
    source = write_pairs(folder / "pairs.tsv")
    out = str(folder / "prepared")
    meta = prepare_rows(source, tokenizer, out, columns=COLUMNS, val_fraction=0.1, num_workers=1, **QUIET)
    return out, meta


# ----------------------------------------------------------------------------- truncation
def test_truncate_in_proportion_exact_rule():
    """Pairs that fit are untouched; a pair that does not fills the budget exactly, the source
    keeping floor(budget * a / (a + b)) (at least 1) and the target the rest; no side is dropped."""
    a, b = truncate_in_proportion(np.array([3, 10, 1, 100, 7, 60, 5]), np.array([4, 30, 100, 1, 7, 20, 5]), 10)
    assert a.tolist() == [3, 2, 1, 9, 5, 7, 5]
    assert b.tolist() == [4, 8, 9, 1, 5, 3, 5]
    # every pair of lengths 1..40 and every budget 2..30, against the rule spelled out
    A, B, budget = np.meshgrid(np.arange(1, 41), np.arange(1, 41), np.arange(2, 31), indexing="ij")
    A, B, budget = A.ravel(), B.ravel(), budget.ravel()
    kept_a, kept_b = np.zeros_like(A), np.zeros_like(B)
    for i in range(0, len(A), 997):   # the rule as a person would write it, on a sample
        x, y, n = int(A[i]), int(B[i]), int(budget[i])
        expected = (x, y) if x + y <= n else (max(1, n * x // (x + y)), n - max(1, n * x // (x + y)))
        got = truncate_in_proportion(np.array([x]), np.array([y]), n)
        assert (int(got[0][0]), int(got[1][0])) == expected, (x, y, n)
    for n in range(2, 31):
        at = budget == n
        kept_a[at], kept_b[at] = truncate_in_proportion(A[at], B[at], n)
    assert (kept_a + kept_b == np.minimum(A + B, budget)).all()
    assert (kept_a >= 1).all() and (kept_b >= 1).all() and (kept_a <= A).all() and (kept_b <= B).all()
    cut = A + B > budget   # each side's share of the budget, within one token
    assert (np.abs(kept_a[cut] - budget[cut] * A[cut] / (A[cut] + B[cut])) < 1).all()


# ----------------------------------------------------------------------------- layout
def expected_row(table: RowTable, row: int, seq_len: int):
    """One row's (ids, positions, languages) built token by token from the table."""
    budget = seq_len - 4
    full_a, full_b = int(table.lengths[row, 0]), int(table.lengths[row, 1])
    a, b = truncate_in_proportion(np.array([full_a]), np.array([full_b]), budget)
    a, b = int(a[0]), int(b[0])
    src = table.tokens[table.starts[row, 0]:table.starts[row, 0] + a].tolist()
    tgt = table.tokens[table.starts[row, 1]:table.starts[row, 1] + b].tolist()
    ids = [EOS_ID] + src + [EOS_ID, EOS_ID] + tgt + [EOS_ID]
    positions = list(range(a + 2)) + list(range(b + 2))
    languages = [0] * (a + 2) + [1] * (b + 2)
    pad = seq_len - len(ids)
    return ids + [PAD_ID] * pad, positions, languages + [0] * pad, len(ids)


def test_layout_positions_restart_at_the_target_and_language_ids(parallel):
    folder, _ = parallel
    source = ParallelSource(folder, "train", SEQ_LEN, 64, seed=3)
    table = RowTable(folder, "train")
    assert source.languages == ("en", "fr")
    seen_cut = 0
    for step in range(4):
        batch = source.batch(step)
        for i, row in enumerate(batch["rows"].tolist()):
            ids, positions, languages, length = expected_row(table, row, SEQ_LEN)
            assert batch["input_ids"][i].tolist() == ids
            assert batch["position_ids"][i, :length].tolist() == positions
            assert batch["segment_ids"][i].tolist() == languages
            assert int(batch["lengths"][i]) == length
            seen_cut += int(table.lengths[row].sum() > SEQ_LEN - 4)
    assert seen_cut > 0   # the long rows were drawn, and cut as the rule says
    # a pure function of (seed, rank, step, micro)
    again = ParallelSource(folder, "train", SEQ_LEN, 64, seed=3).batch(2)
    assert torch.equal(again["input_ids"], source.batch(2)["input_ids"])
    assert not torch.equal(source.batch(2, micro=1)["input_ids"], source.batch(2)["input_ids"])


def test_monolingual_rows_are_one_side_with_its_language(parallel):
    """mlm+tlm's masked-LM rows: <eos> x <eos> of one side of a pair, that side's language id."""
    folder, _ = parallel
    table = RowTable(folder, "train")
    sides = {tuple(table.tokens[table.starts[r, c]:table.starts[r, c] + table.lengths[r, c]].tolist()[:SEQ_LEN - 2]): c
             for r in range(len(table)) for c in (0, 1)}
    mono = ParallelSource(folder, "train", SEQ_LEN, 64, seed=1).batch(0)["monolingual"]
    languages = []
    for ids, segments, length in zip(mono["input_ids"], mono["segment_ids"], mono["lengths"]):
        ids, n = ids.tolist(), int(length)
        assert ids[0] == EOS_ID and ids[n - 1] == EOS_ID and ids[n:] == [PAD_ID] * (SEQ_LEN - n)
        side = sides[tuple(ids[1:n - 1])]
        assert segments[:n].tolist() == [side] * n
        languages.append(side)
    assert 0 < sum(languages) < len(languages)   # both languages appear


# ----------------------------------------------------------------------------- masking
def random_pairs(B: int, T: int, generator, vocab: int = 512):
    """Rows of random regular tokens, sides of 1..30 tokens (some cut in proportion)."""
    a = torch.randint(1, 31, (B,), generator=generator)
    b = torch.randint(1, 31, (B,), generator=generator)
    a, b = (torch.from_numpy(x) for x in truncate_in_proportion(a.numpy(), b.numpy(), T - 4))
    src = torch.randint(NUM_SPECIAL, vocab, (B, 30), generator=generator)
    tgt = torch.randint(NUM_SPECIAL, vocab, (B, 30), generator=generator)
    return pack_translation(src, a, tgt, b, T)


def test_masking_reaches_both_sides_at_the_rate_and_never_separators_or_padding():
    T = 48
    cfg = model_config_for("tlm", ModelConfig(vocab_size=512, seq_len=T, n_layer=1, n_head=2, n_embd=32))
    objective = build_objective("tlm", cfg)
    generator = torch.Generator().manual_seed(0)
    chosen = {0: 0, 1: 0}
    eligible = {0: 0, 1: 0}
    kinds = torch.zeros(3, dtype=torch.long)   # masked, random, kept
    for _ in range(40):
        raw = random_pairs(256, T, generator)
        batch = objective.make_batch(raw, generator)
        picked = batch["labels"] != IGNORE
        ids = raw["input_ids"]
        real = torch.arange(T)[None, :] < raw["lengths"][:, None]
        regular = real & (ids >= NUM_SPECIAL)
        # never an <eos> or a padding position
        assert not (picked & ~regular).any()
        assert torch.equal(batch["targets"], ids.flatten()[batch["positions"]])
        for side in (0, 1):
            on_side = regular & (raw["segment_ids"] == side)
            chosen[side] += int((picked & on_side).sum())
            eligible[side] += int(on_side.sum())
        shown = batch["input_ids"][picked]
        original = ids[picked]
        kinds += torch.tensor([int((shown == MASK_ID).sum()), int(((shown != MASK_ID) & (shown != original)).sum()),
                               int((shown == original).sum())])
        # what the model reads alongside: the source's languages and restarting positions
        assert torch.equal(batch["segment_ids"], raw["segment_ids"])
        assert torch.equal(batch["position_ids"], raw["position_ids"])
        assert torch.equal(batch["attn_mask"], padding_mask(raw["lengths"], T))
    for side in (0, 1):
        n, k = eligible[side], chosen[side]
        sigma = math.sqrt(n * 0.15 * 0.85)
        assert abs(k - 0.15 * n) < 4 * sigma, (side, k / n)
    total = int(kinds.sum())
    # random replacements can hit the original id (1 in 397): counted as kept, a tiny bias
    for share, expected in zip(kinds.tolist(), (0.8, 0.1, 0.1)):
        assert abs(share - expected * total) < 4 * math.sqrt(total * expected * (1 - expected)) + 0.003 * total


def test_the_encoder_reads_the_positions_and_languages_of_the_batch():
    """TLM's loss is exactly masked LM computed densely on the backbone given the batch's
    restarting positions, languages and padding mask (and differs without the restart)."""
    torch.manual_seed(0)
    T = 48
    objective = build_objective("tlm", ModelConfig(vocab_size=512, seq_len=T, n_layer=2, n_head=2, n_embd=32,
                                                   position="learned"))
    raw = random_pairs(16, T, torch.Generator().manual_seed(1))
    batch = objective.make_batch(raw, torch.Generator().manual_seed(2))
    loss, _ = objective(batch)

    def dense_loss(positions):
        hidden = objective.backbone(batch["input_ids"], mask=batch["attn_mask"], positions=positions,
                                    segment_ids=raw["segment_ids"])
        logits = objective.head(hidden, objective.backbone.output_weight).flatten(0, 1)[batch["positions"]]
        return torch.nn.functional.cross_entropy(logits, batch["targets"])

    torch.testing.assert_close(loss, dense_loss(raw["position_ids"]))
    assert not torch.allclose(loss, dense_loss(None))


# ----------------------------------------------------------------------------- the point of TLM
def test_a_masked_word_is_predicted_better_with_its_translation():
    """A synthetic language pair: sentences of random words (nothing in a sentence predicts a
    hidden word of it), the translation word for word (word i of language A <-> word i of B).
    After training, a masked source word is recovered from the translation; with the
    translation side replaced by padding (and hidden from attention) it is a guess among 20."""
    torch.manual_seed(0)
    n_words, T, B = 20, 24, 32
    cfg = ModelConfig(vocab_size=NUM_SPECIAL + 2 * n_words, seq_len=T, n_layer=2, n_head=4, n_embd=64)
    objective = build_objective("tlm", cfg)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3, weight_decay=0.0)

    def pairs(batch_size, generator):
        n = torch.randint(4, 9, (batch_size,), generator=generator)
        words = torch.randint(0, n_words, (batch_size, 8), generator=generator)
        return pack_translation(NUM_SPECIAL + words, n, NUM_SPECIAL + n_words + words, n, T), n

    generator = torch.Generator().manual_seed(1)
    for _ in range(120):
        raw, _ = pairs(B, generator)
        loss, _ = objective(objective.make_batch(raw, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    objective.eval()
    test = torch.Generator().manual_seed(99)
    raw, n = pairs(512, test)
    rows = torch.arange(512)
    column = 1 + torch.randint(0, 8, (512,), generator=test) % n          # one source word per row
    target = raw["input_ids"][rows, column]
    masked = raw["input_ids"].clone()
    masked[rows, column] = MASK_ID

    def accuracy(input_ids, lengths):
        batch = {"input_ids": input_ids, "attn_mask": padding_mask(lengths, T), "segment_ids": raw["segment_ids"],
                 "position_ids": raw["position_ids"], "positions": rows * T + column, "targets": target,
                 "counts": {"targets": torch.tensor(512)}}
        with torch.no_grad():
            _, sums = objective(batch)
        return int(sums["correct"]) / 512

    with_translation = accuracy(masked, raw["lengths"])
    source_half = torch.arange(T)[None, :] < (n + 2)[:, None]
    without = accuracy(torch.where(source_half, masked, PAD_ID), n + 2)
    assert with_translation > 0.8 and without < 0.2, (with_translation, without)


# ----------------------------------------------------------------------------- model and bad inputs
def test_tlm_and_mlm_tlm_declare_language_embeddings():
    """The languages are read by the segment table: n_segment >= 2, in the config that is saved."""
    for name in ("tlm", "mlm+tlm", "tlm+mlm"):
        cfg = model_config_for(name, ModelConfig(vocab_size=512, n_layer=1, n_head=2, n_embd=32))
        assert cfg.n_segment == 2 and cfg.embed_norm


def test_mlm_tlm_reads_monolingual_rows_for_the_mlm_part(parallel):
    folder, _ = parallel
    cfg = ModelConfig(vocab_size=1024, seq_len=SEQ_LEN, n_layer=1, n_head=2, n_embd=32)
    objective = build_objective("mlm+tlm", cfg)
    assert objective.data == "parallel"
    raw = make_source("parallel", folder, "train", SEQ_LEN, 8, **QUIET).batch(0)
    batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    mono = raw["monolingual"]
    assert torch.equal(batch["mlm"]["segment_ids"], mono["segment_ids"])
    assert torch.equal(batch["mlm"]["labels"] != IGNORE, (batch["mlm"]["labels"] != IGNORE) &
                       (torch.arange(SEQ_LEN)[None, :] < mono["lengths"][:, None]))
    assert torch.equal(batch["tlm"]["position_ids"], raw["position_ids"])
    loss, sums = objective(batch)
    assert torch.isfinite(loss) and "mlm/nll" in sums and "tlm/nll" in sums


def test_bad_inputs_are_one_line_errors(parallel, tmp_path):
    with pytest.raises(UserError, match="--pair_field"):
        ParallelSource.row_columns(DataConfig(text_field="en"))
    with pytest.raises(UserError, match="--pair_field and --text_field both name 'en'"):
        ParallelSource.row_columns(DataConfig(text_field="en", pair_field="en"))
    with pytest.raises(UserError, match="--seq_len 6 or more"):
        ParallelSource(parallel[0], "train", 5, 4)
    text = tmp_path / "plain.txt"
    text.write_text("just some text\n")
    assert_user_error(run_in_process("train.py", "--objective", "tlm", "--data", text, "--pair_field", "fr",
                                     "--out_dir", tmp_path / "a", *TINY), "plain text", "rows of a table")
    pairs = write_pairs(tmp_path / "pairs.tsv", n_rows=20)
    assert_user_error(run_in_process("train.py", "--objective", "tlm", "--data", pairs, "--text_field", "en",
                                     "--out_dir", tmp_path / "b", *TINY), "--pair_field")
    assert_user_error(run_in_process("train.py", "--objective", "tlm", "--data", pairs, "--text_field", "en",
                                     "--pair_field", "de", "--out_dir", tmp_path / "c", *TINY), "--pair_field", "de")


@pytest.mark.parametrize("objective", ["tlm", "mlm+tlm"])
def test_a_seq_len_too_short_for_a_pair_is_refused_before_any_data_work(tmp_path, objective):
    pairs = write_pairs(tmp_path / "pairs.tsv", n_rows=20)
    out = tmp_path / "run"
    result = run_in_process("train.py", "--objective", objective, "--data", pairs, "--text_field", "en",
                            "--pair_field", "fr", "--out_dir", out, *TINY, "--seq_len", 5)
    assert_user_error(result, "--seq_len 6 or more", "got 5")
    assert not out.exists() and "tokenizer" not in result.stdout   # refused before the tokenizer trained


def test_cli_trains_tlm_on_a_tsv_and_resumes(tmp_path):
    pairs = write_pairs(tmp_path / "pairs.tsv", n_rows=120)
    out = tmp_path / "run"
    first = run("train.py", "--objective", "tlm", "--data", pairs, "--text_field", "en", "--pair_field", "fr",
                "--out_dir", out, "--max_steps", 3, "--eval_every", 3, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "n_segment=2" in first.stdout and "1 row with an empty cell skipped" in first.stdout
    assert "languages en (id 0, <lang_0>) and fr (id 1, <lang_1>)" in first.stdout
    assert "val loss" in first.stdout
    resumed = run("train.py", "--out_dir", out, "--resume", "--max_steps", 5, "--eval_every", 100)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stdout and "step      5/5" in resumed.stdout
