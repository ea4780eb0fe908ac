"""NSP on a batch whose rows all come from one document: no row can get a random next segment,
so every label would be 0 and accuracy read 1.0 (a validation split of one document did exactly
that). Such rows are now no NSP examples: left out of the loss and metrics, with one warning."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from minilm.config import Config, ModelConfig, ObjectiveConfig
from minilm.data import SegmentPairSource, prepare
from minilm.objectives import IGNORE, build_objective
from minilm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
QUIET = dict(log=lambda *_: None)
WARNING = "every row of an evaluation batch comes from one document"


@pytest.fixture(scope="module")
def one_val_document(tmp_path_factory, tokenizer):
    """20 documents of 5 sentences: val_fraction 0.05 puts exactly one of them in the val split."""
    docs = [" ".join(f"Document {d} says thing number {i} here." for i in range(5)) for d in range(20)]
    folder = tmp_path_factory.mktemp("one_val_document")
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    meta = prepare(str(folder / "corpus.jsonl"), tokenizer, str(folder / "prepared"), val_fraction=0.05,
                   num_workers=1, **QUIET)
    assert meta["val_documents"] == 1 and meta["train_documents"] == 19
    return str(folder / "prepared")


def nsp(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=48, n_layer=1, n_head=2, n_embd=32)
    return build_objective("sop", cfg, tokenizer, ObjectiveConfig(sentence_task="nsp"))


def test_a_one_document_validation_split_reports_no_nsp_accuracy(one_val_document, tokenizer):
    cfg = Config()
    cfg.train.objective, cfg.obj.sentence_task = "sop", "nsp"
    cfg.train.device, cfg.train.eval_batches, cfg.train.batch_size = "cpu", 3, 16
    objective = nsp(tokenizer)
    cfg.model = objective.backbone.cfg
    val = SegmentPairSource(one_val_document, "val", 48, 16, **QUIET)
    trainer = Trainer(cfg, objective, None, val, tokenizer, log=lambda *_: None)
    with pytest.warns(UserWarning, match=WARNING) as caught:
        metrics = trainer.evaluate()
        trainer.evaluate()
    assert len([w for w in caught if WARNING in str(w.message)]) == 1       # once, not per batch
    assert "acc" not in metrics and "loss" not in metrics, metrics          # not a fake 1.0


def test_one_document_rows_are_left_out_of_the_loss(one_val_document, tokenizer):
    objective = nsp(tokenizer).eval()
    raw = SegmentPairSource(one_val_document, "val", 48, 16, **QUIET).batch(0)
    with pytest.warns(UserWarning, match=WARNING):
        batch = objective.make_batch(raw, torch.Generator().manual_seed(0))
    assert (batch["labels"] == IGNORE).all() and int(batch["counts"]["targets"]) == 0
    assert torch.equal(batch["input_ids"], raw["input_ids"])                # nothing was replaced
    loss, sums = objective(batch)
    assert float(loss.detach()) == 0.0 and int(sums["targets"]) == 0 and int(sums["correct"]) == 0


def test_batches_of_several_documents_are_unchanged_and_silent(one_val_document, tokenizer):
    objective = nsp(tokenizer)
    source = SegmentPairSource(one_val_document, "train", 48, 16, seed=0, **QUIET)
    labels = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(40):
            batch = objective.make_batch(source.batch(step), torch.Generator().manual_seed(step))
            assert int(batch["counts"]["targets"]) == 16
            labels.append(batch["labels"])
    labels = torch.cat(labels)
    assert set(labels.tolist()) == {0, 1} and abs(labels.float().mean().item() - 0.5) < 0.1   # 640 rows: 4 sigma
