"""The explainer's shared part (minilm/explain.py): a sentence becomes one row of the data each
objective reads, framed by the data sources' own row builders; the explanation is the batch that
the objective's make_batch makes of it; the command's table, mask grids, PNG and one-line errors;
the checkpoint path; and the gallery in docs/explainer.md, whose text must equal a regeneration.
Objective-specific rows are tested in tests/test_explain_<group>.py, next to their explain."""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

import minilm
from minilm.data.segment_pairs import pack_pairs
from minilm.errors import UserError
from minilm.explain import DASH, GALLERY_SENTENCE, explain, gallery_entries, gallery_markdown
from minilm.losses import IGNORE
from minilm.model import prefix_mask
from minilm.objectives import OBJECTIVES, window_length_for
from minilm.tokenizer import CLS_ID, EOS_ID, PAD_ID, SEP_ID
from tests.conftest import ROOT, run_main
from tests.test_api import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
explain_module = sys.modules["minilm.explain"]   # minilm.explain is also the function (minilm/__init__.py)

TWO = "The function returns a new list. It raises an error when the list is empty."


def run_explain(*args) -> tuple[int, str, str]:
    """`python -m minilm.explain args` in-process, through run_cli: (exit code, stdout, stderr)."""
    return run_main(explain_module.main, ["minilm.explain", *map(str, args)])


# ----------------------------------------------------------------------------- the row is the data's row
def test_a_blocks_row_is_the_sentence_and_its_eos_and_the_explanation_is_make_batch_of_it(tokenizer):
    e = explain("clm", "The list is empty.", tokenizer=tokenizer, seed=3)
    ids = tokenizer.encode("The list is empty.") + [EOS_ID]
    assert e.raw.tolist() == [ids]                      # seq_len fitted: the window is exactly the sentence
    assert e.batch["input_ids"].tolist() == [ids[:-1]] and e.batch["labels"].tolist() == [ids[1:]]
    assert e.columns["reads"] == [tokenizer.id_to_piece(i) for i in ids[:-1]]
    assert e.columns["target"] == [tokenizer.id_to_piece(i) for i in ids[1:]]
    queries, keys, mask = e.masks["causal self-attention"]
    assert queries == keys == e.columns["reads"] and torch.equal(mask, torch.ones(len(ids) - 1, len(ids) - 1).tril().bool())
    assert minilm.explain("clm", "The list is empty.", tokenizer=tokenizer, seed=3).columns == e.columns


def test_a_longer_seq_len_pads_a_row_that_reads_padding_and_ignores_its_targets(tokenizer):
    e = explain("clm", "The list.", tokenizer=tokenizer, seq_len=12)
    n = len(tokenizer.encode("The list.")) + 1
    assert e.raw.shape == (1, 13) and e.raw[0, n:].eq(PAD_ID).all()
    assert e.columns["target"][n - 1:] == [DASH] * (12 - n + 1)
    assert any("padded" in note for note in e.notes)


def test_an_objective_with_its_own_window_reads_the_stream_on_into_the_sentence(tokenizer):
    e = explain("t5", TWO, tokenizer=tokenizer, seq_len=40)
    model_window = window_length_for("t5", minilm.config.ModelConfig(seq_len=40))
    ids = tokenizer.encode(TWO) + [EOS_ID]
    assert e.raw.shape == (1, model_window)
    assert e.raw[0].tolist() == (ids * (model_window // len(ids) + 1))[:model_window]
    assert e.decoder is not None and len(e.decoder["reads"]) == e.batch["decoder_input_ids"].shape[1]


def test_sentence_pairs_are_packed_by_the_sources_row_builder(tokenizer):
    e = explain("sop", TWO, tokenizer=tokenizer)
    a = tokenizer.encode("The function returns a new list.")
    b = tokenizer.encode("It raises an error when the list is empty.")
    assert e.raw["input_ids"][0].tolist() == [CLS_ID] + a + [SEP_ID] + b + [SEP_ID]
    expected = pack_pairs(torch.tensor(a + b), torch.tensor([0]), torch.tensor([len(a)]), torch.tensor([len(a)]),
                          torch.tensor([len(b)]), len(a) + len(b) + 3)
    assert all(torch.equal(x, y) for x, y in zip(expected, (e.raw["input_ids"], e.raw["segment_ids"], e.raw["lengths"])))
    pair = explain("sop", "The list.", text_pair="It is empty.", tokenizer=tokenizer)
    assert pair.raw["a_lengths"].item() == len(tokenizer.encode("The list."))


@pytest.mark.parametrize("name, expect", [
    ("simcse", lambda tok, a, b: [[CLS_ID] + tok.encode(TWO) + [SEP_ID]]),
    ("simcse_sup", lambda tok, a, b: [[[CLS_ID] + a + [SEP_ID] + [PAD_ID] * (max(len(a), len(b)) - len(a)),
                                       [CLS_ID] + b + [SEP_ID] + [PAD_ID] * (max(len(a), len(b)) - len(b))]]),
    ("tlm", lambda tok, a, b: [[EOS_ID] + a + [EOS_ID, EOS_ID] + b + [EOS_ID]]),
])
def test_each_kind_of_row_is_framed_as_its_source_frames_it(name, expect, tokenizer):
    e = explain(name, TWO, tokenizer=tokenizer)
    a = tokenizer.encode("The function returns a new list.")
    b = tokenizer.encode("It raises an error when the list is empty.")
    assert e.raw["input_ids"].tolist() == expect(tokenizer, a, b)


def test_a_labelled_row_is_cls_text_sep_with_a_label(tokenizer):
    e = explain("classify", "The list.", tokenizer=tokenizer, options={"labels": '["a", "b"]'})
    assert e.raw["input_ids"].tolist() == [[CLS_ID] + tokenizer.encode("The list.") + [SEP_ID]]
    assert e.batch["labels"].tolist() == [0]


# ----------------------------------------------------------------------------- the objective's own parts
def test_prefix_lm_marks_its_prefix_and_its_mask_is_the_one_forward_passes(tokenizer, monkeypatch):
    e = explain("prefix_lm", TWO, tokenizer=tokenizer, seed=5)
    P, T = int(e.batch["prefix_lengths"][0]), len(e.columns["reads"])
    assert e.columns["prefix/target"] == ["prefix"] * P + ["target"] * (T - P)
    # targets count from the position that reads the last prefix token
    assert all((e.columns["target"][t] == DASH) == (t + 1 < P) for t in range(T))
    _, _, mask = e.masks["prefix LM self-attention"]
    assert torch.equal(mask, prefix_mask(e.batch["prefix_lengths"], T)[0, 0])
    # the mask the backbone really receives in forward
    from minilm.config import ModelConfig
    from minilm.objectives import build_objective
    model = build_objective("prefix_lm", ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=T, n_layer=1,
                                                     n_head=2, n_embd=32), tokenizer)
    seen = []
    original = type(model.backbone).forward
    monkeypatch.setattr(type(model.backbone), "forward",
                        lambda self, ids, *args, mask=None, **kw: seen.append(mask) or original(self, ids, *args, mask=mask, **kw))
    model(e.batch)
    assert torch.equal(seen[0][0, 0], mask)


def test_the_objectives_options_change_its_batch_and_an_unknown_one_is_refused(tokenizer):
    plain = explain("prefix_lm", TWO, tokenizer=tokenizer, seed=1)
    after_eos = explain("clm", TWO, tokenizer=tokenizer, options={"predict_after_eos": "false"})
    assert after_eos.columns["target"][-1] == tokenizer.id_to_piece(EOS_ID)   # <eos> itself stays a target
    with pytest.raises(UserError, match=r"--mask_prob is no option of clm"):
        explain("clm", TWO, tokenizer=tokenizer, options={"mask_prob": 0.3})
    with pytest.raises(UserError, match=r"--predict_after_eos expects true or false"):
        explain("clm", TWO, tokenizer=tokenizer, options={"predict_after_eos": "maybe"})
    assert plain.columns["reads"] == explain("prefix_lm", TWO, tokenizer=tokenizer, seed=1).columns["reads"]


def test_the_seed_fixes_the_choices(tokenizer):
    draws = {int(explain("prefix_lm", TWO, tokenizer=tokenizer, seed=s).batch["prefix_lengths"]) for s in range(8)}
    assert len(draws) > 1
    assert explain("prefix_lm", TWO, tokenizer=tokenizer, seed=4).columns == \
        explain("prefix_lm", TWO, tokenizer=tokenizer, seed=4).columns


def same(a, b) -> bool:
    """Batches (nested dicts of tensors) equal key by key, tensor by tensor."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("name", sorted(n for n in OBJECTIVES if n != "classify"))
def test_every_objective_explains_its_own_training_batch_in_columns_of_one_string_per_position(name, tokenizer):
    e = explain(name, TWO, tokenizer=tokenizer, seed=7)
    # the batch is what the objective's make_batch makes of the row with the seed's generator
    from minilm.config import ModelConfig
    from minilm.objectives import build_objective
    objective = build_objective(name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=e.seq_len, n_layer=1,
                                                  n_head=2, n_embd=32), tokenizer)
    extra = {} if e.lengths is None else {"lengths": e.lengths}
    assert same(e.batch, objective.make_batch(e.raw, torch.Generator().manual_seed(7), **extra))
    assert list(e.columns)[:2] == ["reads", "target"]
    assert len({len(v) for v in e.columns.values()}) == 1
    for queries, keys, mask in e.masks.values():
        assert mask.dtype == torch.bool and mask.shape == (len(queries), len(keys))
    assert e.table().count("\n") >= len(e.columns["reads"])


# ----------------------------------------------------------------------------- the command
def test_the_command_prints_one_aligned_row_per_position_and_the_grid(tokenizer, tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(tokenizer.model_bytes)
    code, out, err = run_explain("--objective", "clm", "The list is empty.", "--tokenizer", path, "--seed", 2)
    assert code == 0, err
    e = explain("clm", "The list is empty.", tokenizer=tokenizer, seed=2)
    rows = [line for line in out.splitlines() if re.match(r"^\d+ ", line)]
    assert [row.split()[1] for row in rows[:len(e.columns["reads"])]] == e.columns["reads"]
    starts = {line.index(e.columns["target"][i]) for i, line in enumerate(rows[:len(e.columns["reads"])])}
    assert len(starts) == 1                                   # the target column is aligned
    code, bare_flag, err = run_explain("--objective", "clm", "--predict_after_eos", "The list is empty.", "--masks",
                                       "--tokenizer", path, "--seed", 2)
    assert code == 0 and bare_flag == out, err          # a bool flag alone means true (its default here)
    grid = [line for line in out.splitlines() if re.fullmatch(r"\s*\S+ [x.]+", line)]
    assert "".join(grid).count("x") == int(e.masks["causal self-attention"][2].sum())


@pytest.mark.parametrize("args, message", [
    (["--objective", "clm", ""], "empty"),
    (["--objective", "clm", "word " * 40, "--seq_len", "8"], "longer than --seq_len 8"),
    (["--objective", "sop", "The list is empty"], "is one sentence"),
    (["--objective", "clm", "a", "b"], "give one sentence"),
    (["--objective", "clm", "a", "--mask_prob", "0.3"], "--mask_prob is no option of clm"),
    (["--objective", "nope", "a"], "unknown --objective"),
    (["--objective", "mlm+sop", TWO], "one objective at a time"),
    (["--objective", "clm", "a", "--no_such_flag", "1"], "unknown flag --no_such_flag"),
    (["--objective", "clm", "word " * 600], "fits rows of up to 512"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tokenizer, tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(tokenizer.model_bytes)
    code, out, err = run_explain(*args, "--tokenizer", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_a_checkpoint_gives_its_tokenizer_model_and_objective_and_refuses_another(tokenizer, tmp_path):
    ckpt = save_tiny(tmp_path / "t5.pt", "t5", tokenizer)
    e = explain(None, TWO, ckpt=ckpt)
    assert e.objective == "t5"
    assert e.raw.shape[1] == window_length_for("t5", minilm.config.ModelConfig(seq_len=32))   # the model's own window
    code, out, err = run_explain("--ckpt", ckpt, "--objective", "clm", TWO)
    assert code == 2 and "is a checkpoint of --objective t5, not clm" in err
    code, out, err = run_explain("--ckpt", ckpt, "word " * 60)
    assert code == 2 and "longer than" in err
    with pytest.raises(UserError, match="carries its own tokenizer"):
        explain(None, TWO, ckpt=ckpt, tokenizer=tokenizer)
    labelled = explain(None, "The list.", ckpt=save_tiny(tmp_path / "classify.pt", "classify", tokenizer))
    assert labelled.objective == "classify" and labelled.raw["input_ids"][0, 0] == CLS_ID


def test_png_draws_the_table_and_masks_or_names_the_extra(tokenizer, tmp_path, monkeypatch):
    e = explain("prefix_lm", TWO, tokenizer=tokenizer)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=re.escape('pip install -e ".[plot]"')):
            e.save_png(str(tmp_path / "x.png"))
        return
    path = e.save_png(str(tmp_path / "x.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if the extra were not installed
    with pytest.raises(UserError, match=re.escape('pip install -e ".[plot]"')):
        e.save_png(str(tmp_path / "y.png"))


# ----------------------------------------------------------------------------- the gallery
def test_the_committed_gallery_is_current():
    """docs/explainer.md's text equals a fresh regeneration (`python -m minilm.explain --gallery
    docs/`); the PNGs are not compared (their bytes differ across matplotlib versions), the data
    behind them is: the tables and mask titles in the markdown."""
    path = os.path.join(ROOT, "docs", "explainer.md")
    committed = open(path, encoding="utf-8").read()
    made_with = re.search(r"Python (\d+\.\d+)", committed).group(1)
    if made_with != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the gallery was made with Python {made_with}, whose standard library is the built-in corpus "
                    "the throwaway tokenizer is trained on")
    fresh = gallery_markdown(gallery_entries())
    assert committed == fresh, "docs/explainer.md is stale: run python -m minilm.explain --gallery docs/ and commit it"
    for name in re.findall(r"\]\(explainer/(\w+)\.png\)", committed):
        assert os.path.isfile(os.path.join(ROOT, "docs", "explainer", f"{name}.png")), name


def test_the_gallery_shows_every_registered_objective():
    entries = dict(gallery_entries(GALLERY_SENTENCE))
    assert list(entries) == list(OBJECTIVES)
    text = gallery_markdown(list(entries.items()))
    for name in OBJECTIVES:
        assert f"## {name}\n" in text


# ----------------------------------------------------------------------------- a checkpoint's predictions
@pytest.mark.parametrize("name", ["clm", "prefix_lm", "mlm", "span", "t5", "ul2"])
def test_with_a_checkpoint_the_predictions_are_what_forward_computes(name, tokenizer, tmp_path, monkeypatch):
    """With --ckpt the table gains "predicts" at every shown target: the model's argmax there,
    equal to the argmax of the logits the objective's own forward computes (the masked LMs' and
    the prefix LM's sparse heads at their targets only, the decoders' over every position)."""
    path = save_tiny(tmp_path / f"{name}.pt", name, tokenizer, seed=1)
    e = explain(None, TWO, ckpt=path, seed=2)
    table = e.decoder if e.decoder and "target" in e.decoder else e.columns
    shown = [guess for target, guess in zip(table["target"], table["predicts"]) if target != DASH]
    assert shown and DASH not in shown
    assert all(guess == DASH for target, guess in zip(table["target"], table["predicts"]) if target == DASH)
    objective = minilm.load(path, device="cpu").objective.eval()
    computed = []
    if hasattr(objective, "head"):    # the masked LMs: the head runs at the chosen positions, in order
        objective.head.register_forward_hook(lambda module, args, out: computed.append(out))
    else:
        logits = objective.backbone.logits
        monkeypatch.setattr(objective.backbone, "logits", lambda hidden: computed.append(logits(hidden)) or computed[-1])
    with torch.no_grad():
        objective(e.batch)
        objective.predictions(e.batch)
    from_forward, from_predictions = computed[0], computed[1][0]          # (N or B x T, V), (T, V)
    labels = e.batch["labels"][0] if "labels" in e.batch else None
    if from_forward.dim() > 2:           # a dense head: row 0's positions that have a target
        from_forward = from_forward[0][labels != IGNORE]
    at_targets = from_predictions[labels != IGNORE] if labels is not None else \
        from_predictions[e.batch["positions"][e.batch["positions"] < from_predictions.shape[0]]]
    # the same logits, not only the same argmax: the mask, positions and segments all reach the
    # dense path as they reach forward's
    assert torch.allclose(at_targets, from_forward, atol=1e-5)
    assert [tokenizer.id_to_piece(int(i)) for i in from_forward.argmax(-1)] == shown


def test_without_a_checkpoint_nothing_is_predicted(tokenizer):
    assert "predicts" not in explain("mlm", TWO, tokenizer=tokenizer, seed=2).columns
