"""Contrastive sentence embeddings (minilm/objectives/simcse.py) and their data
(minilm/data/sentences.py, pairs.py): the loss is InfoNCE computed by hand, dropout is the only
difference between the two views, pooling ignores padding, accumulation is per-micro-batch
InfoNCE (not one big batch), the sources frame and draw what they say, and the command line
trains, evaluates and embeds. The two-process gather is in tests/test_distributed.py."""
from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import minilm
from minilm.config import Config, ModelConfig, parse_overrides
from minilm.data import PairSource, SentenceSource, frame_sentences, prepare_rows, split_sentences
from minilm.errors import UserError
from minilm.objectives import build_objective, finalize, model_defaults_for
from minilm.objectives.simcse import embedding_sums, info_nce_logits
from minilm.tokenizer import CLS_ID, PAD_ID, SEP_ID
from minilm.trainer import Trainer
from tests.conftest import run_in_process
from tests.test_api import save_tiny
from tests.test_cli import assert_user_error
from tests.test_trainer import recorded

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")   # conftest.py

SEQ_LEN = 16


def tiny(tokenizer, name="simcse", dropout=0.0, **options):
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=SEQ_LEN, n_layer=1, n_head=2, n_embd=32,
                            dropout=dropout)
    for key, value in options.items():
        setattr(cfg.obj, key, value)
    torch.manual_seed(0)
    return build_objective(name, cfg.model, tokenizer, cfg.obj), cfg


@pytest.fixture(scope="module")
def sentences(prepared, tokenizer):
    return SentenceSource(prepared[0], "train", SEQ_LEN, 6, seed=3, tokenizer=tokenizer)


def hand_info_nce(z1, z2, temperature):
    """-mean_i log(exp(cos(z1_i, z2_i) / t) / sum_j exp(cos(z1_i, z2_j) / t)), with Python floats."""
    total = 0.0
    for i in range(len(z1)):
        logits = [float(F.cosine_similarity(z1[i], z2[j], dim=0)) / temperature for j in range(len(z2))]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(z1)


def views(objective, batch):
    """(z1, z2): the embeddings the loss compares (after the training-only MLP), one pass."""
    ids, lengths = batch["input_ids"], batch["lengths"]
    B, V, T = ids.shape
    pooled = objective.embed(ids.transpose(0, 1).reshape(V * B, T), lengths.transpose(0, 1).reshape(V * B))
    z = objective.mlp(pooled) if objective.mlp is not None else pooled
    return z[:B], z[B:2 * B]


# ----------------------------------------------------------------------------- the loss
# mean pooling of an untrained model already tells sentences apart (loss ~4e-4 at 0.05): a
# higher temperature keeps that case's loss far from 0, where a wrong term would show
@pytest.mark.parametrize("pooling, temperature", [("first", 0.05), ("mean", 1.0)])
def test_loss_is_info_nce_over_two_dropout_views(pooling, temperature, tokenizer, sentences):
    objective, _ = tiny(tokenizer, dropout=0.1, simcse_pooling=pooling, simcse_temperature=temperature)
    objective.train()
    batch = objective.make_batch(sentences.batch(0))
    torch.manual_seed(11)                       # the same dropout masks for the hand computation...
    z1, z2 = views(objective, batch)
    torch.manual_seed(11)                       # ...and for the objective's own forward
    loss, sums = objective(batch)
    assert not torch.allclose(z1, z2)           # dropout made the two copies of each sentence differ
    assert loss.item() == pytest.approx(hand_info_nce(z1.detach(), z2.detach(), temperature), rel=1e-5)
    assert loss.item() > 0.1
    assert int(sums["targets"]) == 6 and float(sums["nll"]) == pytest.approx(6 * loss.item(), rel=1e-6)


def test_without_dropout_the_views_are_one_vector_and_identical_sentences_cost_log_batch(tokenizer, sentences):
    raw = sentences.batch(0)
    for objective, mode in ((tiny(tokenizer, dropout=0.0)[0].train(), "train, dropout 0"),
                            (tiny(tokenizer, dropout=0.1)[0].eval(), "eval, dropout 0.1")):
        z1, z2 = views(objective, objective.make_batch(raw))
        assert torch.equal(z1, z2), mode
        logits, labels = info_nce_logits(z1, z2, 0.05)
        assert torch.allclose(logits.diagonal(), torch.full((6,), 20.0), atol=1e-4), mode   # cos 1 / 0.05
    # B copies of one sentence: every key is the positive, so the softmax is uniform: log B
    objective = tiny(tokenizer, dropout=0.0)[0].train()
    same = {key: value[:1].expand(5, *value.shape[1:]).clone() for key, value in raw.items()}
    loss, _ = objective(objective.make_batch(same))
    assert loss.item() == pytest.approx(math.log(5), abs=1e-5)


def test_hard_negatives_are_extra_columns_masked_where_absent_and_weighted(tokenizer):
    torch.manual_seed(0)
    q, k, n = torch.randn(3, 3, 8).unbind()
    has = torch.tensor([True, False, True])
    logits, labels = info_nce_logits(q, k, 0.5, negatives=n, negative_valid=has, hard_negative_weight=0.7)
    cos = lambda a, b: F.cosine_similarity(a[:, None], b[None, :], dim=-1) / 0.5   # noqa: E731
    assert logits.shape == (3, 6) and labels.tolist() == [0, 1, 2]
    assert torch.allclose(logits[:, :3], cos(q, k), atol=1e-6)
    expected = cos(q, n) + 0.7 * torch.eye(3)                       # own negative + weight (a logit offset)
    assert torch.allclose(logits[:, [3, 5]], expected[:, [0, 2]], atol=1e-6)
    assert torch.isinf(logits[:, 4]).all()                          # row 1 has no negative: no column
    by_hand = [math.log(sum(math.exp(v) for v in row if v != float("-inf"))) - row[i]
               for i, row in enumerate(logits.tolist())]
    assert F.cross_entropy(logits, labels).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)


@pytest.mark.parametrize("pooling", ["first", "mean"])
def test_pooling_ignores_padding(pooling, tokenizer, sentences):
    objective, _ = tiny(tokenizer, simcse_pooling=pooling)
    objective.eval()
    raw = sentences.batch(1)
    ids, lengths = raw["input_ids"][:, :12], raw["lengths"].clamp(max=12)   # cut to 12 (no [SEP]: no matter)
    padded = torch.cat([ids, torch.full((6, 4), PAD_ID)], dim=1)            # 4 more pads
    noisy = padded.clone()
    t = torch.arange(16)[None, :]
    noisy[t >= lengths[:, None]] = 42                                        # any ids where pads are
    with torch.no_grad():
        base = objective.embed(ids, lengths)
        assert torch.allclose(objective.embed(padded, lengths), base, atol=1e-6)
        assert torch.allclose(objective.embed(noisy, lengths), base, atol=1e-6)


# ----------------------------------------------------------------------------- accumulation
def test_accumulation_is_per_micro_batch_info_nce_not_one_big_batch(tokenizer, sentences):
    """Two micro-batches of 6: the trainer's accumulated gradient is that of (InfoNCE sum of
    micro-batch 1 + that of micro-batch 2) / 12 rows, each over its own 6 keys; the gradient of
    one InfoNCE over all 12 (11 negatives per row) is another."""
    objective, cfg = tiny(tokenizer)
    cfg.train.grad_accum, cfg.train.batch_size, cfg.train.device = 2, 6, "cpu"
    trainer = Trainer(cfg, objective, sentences, None, tokenizer, log=lambda *_: None)
    made = recorded(objective)
    trainer.accumulate_gradients(0)
    del objective.make_batch
    accumulated = {name: p.grad.clone() for name, p in objective.named_parameters()}

    def gradient(groups):
        objective.zero_grad()
        total = 0
        for batch in groups:
            z1, z2 = views(objective, batch)
            logits = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / 0.05
            total = total + F.cross_entropy(logits, torch.arange(len(z1)), reduction="sum")
        (total / 12).backward()
        return {name: p.grad.clone() for name, p in objective.named_parameters()}

    per_micro = gradient(made)
    whole = gradient([{key: torch.cat([made[0][key], made[1][key]]) for key in ("input_ids", "lengths")}])
    for name, value in accumulated.items():
        assert torch.allclose(value, per_micro[name], atol=1e-6, rtol=1e-4), name
    assert not all(torch.allclose(value, whole[name], atol=1e-5) for name, value in accumulated.items())


# ----------------------------------------------------------------------------- the sources
def test_sentence_source_frames_whole_sentences_and_their_neighbours(prepared, tokenizer, sentences):
    starts, ends, documents = split_sentences(sentences.tokens, tokenizer)
    b1, b2 = sentences.batch(4, 1), sentences.batch(4, 1)
    for key in b1:
        assert torch.equal(b1[key], b2[key]), key                        # a pure function of its arguments
    assert not torch.equal(b1["input_ids"], sentences.batch(5, 1)["input_ids"])
    text_of = {}
    for i in range(len(starts)):                                        # sentence text -> its index
        text_of.setdefault(tuple(sentences.tokens[starts[i]:ends[i]].tolist()), i)
    whitespace = tokenizer.whitespace_table
    for _ in range(5):
        batch = sentences.batch(random.randrange(1000))
        for row, length, nrow, nlength, has in zip(batch["input_ids"], batch["lengths"], batch["neighbour_ids"],
                                                   batch["neighbour_lengths"], batch["has_neighbour"]):
            n = int(length)
            assert row[0] == CLS_ID and row[n - 1] == SEP_ID and (row[n:] == PAD_ID).all()
            body = row[1:n - 1]
            assert not whitespace[body[-1]]                             # trailing whitespace dropped
            # the body starts a sentence of the stream, and is all of it up to SEQ_LEN - 2 tokens
            matches = [i for i in range(len(starts))
                       if sentences.tokens[starts[i]:starts[i] + len(body)].tolist() == body.tolist()]
            assert matches, body
            if has:
                neighbour = nrow[1:int(nlength) - 1].tolist()
                assert any(documents[i + d] == documents[i] and 0 <= i + d < len(starts)
                           and sentences.tokens[starts[i + d]:starts[i + d] + len(neighbour)].tolist() == neighbour
                           for i in matches for d in (-1, 1) if 0 <= i + d < len(starts))


def test_frame_sentences_puts_cls_text_sep_then_padding():
    ids = torch.tensor([[7, 8, 9], [10, 0, 0], [0, 0, 0]])
    framed, lengths = frame_sentences(ids, torch.tensor([3, 1, 0]), 6)
    assert framed.tolist() == [[CLS_ID, 7, 8, 9, SEP_ID, PAD_ID], [CLS_ID, 10, SEP_ID, PAD_ID, PAD_ID, PAD_ID],
                               [CLS_ID, SEP_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert lengths.tolist() == [5, 3, 2]


def pairs_table(folder, texts, n_rows=200, empty_negatives=True):
    """A .tsv of (anchor, positive, negative): the positive is the anchor with a quarter of its words
    dropped, the negative another row's anchor (every fifth row none, when empty_negatives)."""
    rng = random.Random(0)
    sentences = [s.strip().replace("\t", " ").replace("\n", " ") for text in texts for s in text.split(". ")]
    sentences = [s for s in sentences if 6 <= len(s.split()) <= 20][:n_rows]
    lines = ["anchor\tpositive\tnegative"]
    for i, anchor in enumerate(sentences):
        words = anchor.split()
        kept = [w for w in words if rng.random() > 0.25] or words
        negative = "" if empty_negatives and i % 5 == 0 else sentences[(i + 7) % len(sentences)]
        lines.append(f"{anchor}\t{' '.join(kept)}\t{negative}")
    path = os.path.join(folder, "pairs.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path, sentences


def test_pair_source_reads_anchor_positive_and_optional_negative(tmp_path, tokenizer, texts):
    path, rows = pairs_table(str(tmp_path), texts, n_rows=40)
    data = parse_overrides(["--pair_field", "positive", "--negative_field", "negative", "--text_field", "anchor"]).data
    columns, optional, label = PairSource.row_columns(data)
    assert [name for name, _ in columns] == ["anchor", "positive", "negative"] and optional == {"negative"}
    assert label is None
    folder = str(tmp_path / "prepared")
    prepare_rows(path, tokenizer, folder, columns=columns, optional=optional, val_fraction=0.1, num_workers=1,
                 log=lambda *_: None)
    source = PairSource(folder, "train", 64, 8, seed=1)
    batch = source.batch(0)
    assert batch["input_ids"].shape == (8, 3, 64) and batch["lengths"].shape == (8, 3)
    for row, lengths, has in zip(batch["input_ids"], batch["lengths"], batch["has_negative"]):
        texts_of_row = [tokenizer.decode(view[1:int(n) - 1].tolist()) for view, n in zip(row, lengths)]
        assert (row[:, 0] == CLS_ID).all()
        i = [r.strip() for r in rows].index(texts_of_row[0].strip())
        assert set(texts_of_row[1].split()) <= set(rows[i].split())     # words of the anchor
        assert bool(has) == (i % 5 != 0) == bool(texts_of_row[2])


@pytest.mark.parametrize("flags, message", [
    ([], r"^--objective simcse_sup trains on \(anchor, positive\) rows: pass --pair_field"),
    (["--pair_field", "text"], r"^--text_field and --pair_field both name the column 'text'"),
])
def test_pair_columns_must_be_named_and_distinct(flags, message):
    with pytest.raises(UserError, match=message):
        PairSource.row_columns(parse_overrides(flags).data)


# ----------------------------------------------------------------------------- metrics
def test_embedding_metrics_are_wang_and_isola_from_sums_that_add_over_batches():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 4).unbind()
    valid = torch.tensor([True, True, False, True, True])
    halves = [embedding_sums(a[:3], b[:3], valid[:3]), embedding_sums(a[3:], b[3:], valid[3:])]
    simcse = build_objective("simcse", ModelConfig(vocab_size=400, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    metrics = finalize({key: halves[0][key] + halves[1][key] for key in halves[0]}, simcse)   # its metrics()
    ua, ub = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    align = [float(((ua[i] - ub[i]) ** 2).sum()) for i in range(5) if valid[i]]
    pairs = [math.exp(-2 * float(((ua[i] - ua[j]) ** 2).sum())) for lo, hi in ((0, 3), (3, 5))
             for i in range(lo, hi) for j in range(i + 1, hi)]
    assert metrics["align"] == pytest.approx(sum(align) / 4, rel=1e-5)
    assert metrics["uniform"] == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)
    correct = 0
    for lo, hi in ((0, 3), (3, 5)):                       # nearest valid second text, per batch
        for i in range(lo, hi):
            candidates = [j for j in range(lo, hi) if valid[j]]
            if valid[i]:
                correct += max(candidates, key=lambda j: float(ua[i] @ ub[j])) == i
    assert metrics["retrieval_acc"] == pytest.approx(correct / 4)
    assert metrics["retrieval_chance"] == pytest.approx(2 / 4)     # 1/2 for both batches' pairs
    assert not any(key.endswith(("_sum", "_count", "_correct")) for key in metrics)


# ----------------------------------------------------------------------------- dropout default
def test_dropout_defaults_to_0_1_unless_the_command_line_gives_it():
    base = ModelConfig()
    assert model_defaults_for("simcse", base, set()).dropout == 0.1
    assert model_defaults_for("simcse_sup", base, {"n_layer"}).dropout == 0.1
    assert model_defaults_for("simcse", base, {"dropout"}).dropout == 0.0   # --dropout 0 given: kept
    assert model_defaults_for("mlm", base, set()).dropout == 0.0


def test_mfu_counts_two_passes_per_sentence(tokenizer):
    from minilm.flops import flops_per_token, matmul_weights
    objective, _ = tiny(tokenizer, simcse_pooling="mean")             # no MLP: exactly the encoder twice
    one_pass = flops_per_token(matmul_weights(objective.backbone, lm_head=False), 1, 2, 16, SEQ_LEN)
    assert objective.flops_per_token() == 2 * one_pass
    with_mlp, _ = tiny(tokenizer, simcse_pooling="first")              # + the MLP on one position per view
    assert with_mlp.flops_per_token() == 2 * (one_pass + 6 * (32 * 32 + 32) / SEQ_LEN)


# ----------------------------------------------------------------------------- the command line
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--seq_len", "32", "--vocab_size", "512",
        "--device", "cpu", "--threads", "1", "--warmup_steps", "2", "--lr", "3e-3", "--log_every", "5"]


def val_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "val_loss" in line]


@pytest.fixture(scope="module")
def unsupervised_run(tmp_path_factory, corpus_dir):
    out = str(tmp_path_factory.mktemp("simcse"))
    result = run_in_process("train.py", "--objective", "simcse", "--data", corpus_dir, "--out_dir", out, *TINY,
                            "--batch_size", 16, "--max_steps", 40, "--eval_every", 5, "--eval_batches", 8,
                            "--val_fraction", 0.3)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_train_simcse_on_sentences_spreads_them_and_reports_embedding_metrics(unsupervised_run):
    out, stdout = unsupervised_run
    assert "dropout=0.1" in stdout                        # the objective's default, printed and saved
    assert minilm.load(out, device="cpu").config.model.dropout == 0.1
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert losses[-1] < 0.6 * losses[0]                   # the dropout-view InfoNCE is learnt
    first, last = val_rows(out)[0], val_rows(out)[-1]
    for row in (first, last):
        assert 0 <= row["val_align"] <= 4 and row["val_uniform"] <= 0
        assert row["val_retrieval_chance"] == pytest.approx(1 / 16, rel=0.05)   # ~16 neighbours per batch
    assert last["val_uniform"] < first["val_uniform"] - 0.2   # the sentences spread over the sphere


def test_sample_embed_prints_the_cosine_matrix_of_the_api_vectors(unsupervised_run):
    out, _ = unsupervised_run
    texts = ["The list type is mutable.", "Lists can be changed in place.", "Sockets open network connections."]
    result = run_in_process("sample.py", "--ckpt", out, "--embed", *texts, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "cosine similarity of 3 texts (simcse, first pooling):"
    matrix = [[float(v) for v in line.split()[1:4]] for line in lines[2:]]
    vectors = minilm.load(out, device="cpu").embed(texts)
    expected = F.normalize(vectors, dim=-1) @ F.normalize(vectors, dim=-1).T
    assert torch.allclose(torch.tensor(matrix), expected, atol=6e-4)
    assert [json.loads(line.split("  ", )[-1].strip()) for line in lines[2:]] == texts


def test_embed_pools_as_trained_whatever_the_batch(unsupervised_run, tokenizer):
    model = minilm.load(unsupervised_run[0], device="cpu")
    alone = model.embed(["A short one."])
    batched = model.embed(["A short one.", "A longer one that pads it."])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    ids = [CLS_ID] + model.tokenizer.encode("A short one.") + [SEP_ID]
    with torch.no_grad():
        hidden = model.objective.backbone(torch.tensor([ids]), mask=None)
    assert torch.allclose(alone[0], hidden[0, 0], atol=1e-5)            # [CLS], before the training MLP


def test_embed_of_other_encoders_is_the_mean_and_decoders_are_refused(tokenizer, tmp_path):
    mlm = minilm.load(save_tiny(tmp_path / "mlm.pt", "mlm", tokenizer), device="cpu")
    ids = torch.tensor([[3] + tokenizer.encode("A short one.")])      # <eos> text: a plain window
    with torch.no_grad():
        mean = mlm.objective.backbone(ids, mask=None)[0].mean(dim=0)
    assert torch.allclose(mlm.embed("A short one.")[0], mean, atol=1e-5)
    clm = save_tiny(tmp_path / "clm.pt", "clm", tokenizer)
    result = run_in_process("sample.py", "--ckpt", clm, "--embed", "a", "b", "--device", "cpu")
    assert_user_error(result, "--embed needs an encoder checkpoint", "holds a decoder (clm)")


@pytest.mark.parametrize("args, fragments", [
    (["--embed"], ["--embed needs at least one text"]),
    (["--embed", "a", "--fill", "x <mask>"], ["--embed and --fill exclude each other"]),
])
def test_sample_embed_bad_input_is_one_line(args, fragments, unsupervised_run):
    assert_user_error(run_in_process("sample.py", "--ckpt", unsupervised_run[0], *args, "--device", "cpu"),
                      *fragments)


def test_train_simcse_sup_retrieves_positives_far_above_chance(tmp_path, texts):
    path, _ = pairs_table(str(tmp_path), texts)
    out = str(tmp_path / "out")
    result = run_in_process("train.py", "--objective", "simcse_sup", "--data", path, "--text_field", "anchor",
                            "--pair_field", "positive", "--negative_field", "negative", "--out_dir", out, *TINY,
                            "--batch_size", 16, "--max_steps", 30, "--eval_every", 30, "--eval_batches", 4,
                            "--val_fraction", 0.3, "--dropout", 0.05)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropout=0.05" in result.stdout                # an explicit --dropout beats the objective's default
    last = val_rows(out)[-1]
    assert last["val_retrieval_acc"] > 4 * last["val_retrieval_chance"]


@pytest.mark.parametrize("flags, fragments", [
    (["--objective", "simcse_sup"], ["--pair_field naming the positive's column"]),
    (["--objective", "simcse", "--simcse_pooling", "last"], ["--simcse_pooling must be one of first, mean"]),
    (["--objective", "simcse", "--simcse_temperature", "0"], ["--simcse_temperature must be > 0"]),
    (["--objective", "simcse", "--seq_len", "2"], ["simcse frames each text as [CLS] text [SEP]: it needs "
                                                   "--seq_len 3 or more, got 2"]),
])
def test_bad_simcse_input_is_one_line(flags, fragments, tmp_path, corpus_dir):
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "out", *TINY, *flags)
    assert_user_error(result, *fragments)
