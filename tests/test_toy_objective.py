"""Issue 19's proof of the objective contract: an objective written in one file outside the
library (tests/toy_objective.py) and registered through minilm.objectives.register trains with
train.py (its options are flags, --help lists them), resumes exactly, and serves minilm.load,
with no library file edited for it."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import minilm
from minilm.checkpoint import load_checkpoint
from minilm.errors import UserError
from minilm.objectives import OBJECTIVES, register
from tests.conftest import run_in_process
from tests.toy_objective import RandomTokenDetection

pytestmark = pytest.mark.usefixtures("peak_flops_once")

FLAGS = ["--objective", "random_detect", "--toy_replace_prob", "0.3", "--n_layer", "1", "--n_head", "2",
         "--n_embd", "32", "--seq_len", "32", "--batch_size", "4", "--max_steps", "6", "--eval_every", "3",
         "--ckpt_every", "3", "--keep_checkpoints", "0", "--eval_batches", "2", "--log_every", "1",
         "--warmup_steps", "1", "--device", "cpu", "--threads", "1", "--num_workers", "1"]


@pytest.fixture
def registered():
    """The toy registered for one test; the registry restored after it (no other test sees it)."""
    saved = dict(OBJECTIVES)
    register(RandomTokenDetection)
    yield
    OBJECTIVES.clear()
    OBJECTIVES.update(saved)


@pytest.fixture
def tokenizer_file(tmp_path, tokenizer):
    path = tmp_path / "tokenizer.model"
    tokenizer.save(str(path))
    return str(path)


def test_help_lists_the_registered_objective_and_its_options(registered):
    out = run_in_process("train.py", "--help").stdout
    assert "--toy_replace_prob 0.15" in out and "random_detect: the share of tokens replaced" in out
    assert "random_detect" in out.split("objectives:")[1]
    bad = run_in_process("train.py", "--objective", "random_detect", "--toy_replace_prob", "1.5")
    assert bad.returncode == 2 and "--toy_replace_prob must be in (0, 1), got 1.5" in bad.stderr


def test_it_trains_resumes_exactly_and_loads(registered, tmp_path, corpus_dir, tokenizer_file):
    straight = tmp_path / "straight"
    result = run_in_process("train.py", "--data", corpus_dir, "--tokenizer", tokenizer_file, "--out_dir", straight,
                            *FLAGS)
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(str(straight / "ckpt-00000006.pt"))
    config = state["config"]
    # its options, its configure (the embedding norm) and its defaults (lr 1e-3) are the saved run
    assert config["obj"]["toy_replace_prob"] == 0.3
    assert config["model"]["embed_norm"] is True and config["train"]["lr"] == 1e-3
    rows = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    evals = [row for row in rows if any(k.endswith("baseline_gap") for k in row)]
    assert evals, "each evaluation reports the distance from the all-original baseline"

    # interrupted after step 3, resumed: the same weights at step 6 as the straight run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    os.remove(resumed / "ckpt-00000006.pt")
    again = run_in_process("train.py", "--out_dir", resumed, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    a, b = state["model"], load_checkpoint(str(resumed / "ckpt-00000006.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the weights moved: six steps are not nothing
    first = load_checkpoint(str(straight / "ckpt-00000003.pt"))["model"]
    assert not torch.equal(first["head.weight"], a["head.weight"])

    # minilm.load serves what it declares (embed), and refuses the rest naming what fits
    model = minilm.load(str(resumed), device="cpu")
    assert model.name == "random_detect"
    vectors = model.embed(["The cat sat.", "A dog ran."])
    assert vectors.shape == (2, 32) and torch.isfinite(vectors).all()
    with pytest.raises(UserError, match="embed"):
        model.fill("The <mask> sat.")
