"""Data parallelism on CPU with gloo, two real processes launched by torchrun from the test.

The exactness claims of minilm/distributed.py: 2 processes x 1 micro-batch == 1 process x 2
micro-batches (same windows, same normalisation), parameters identical on every rank, a
two-process run resumes exactly, FSDP2 checkpoints load into a one-process run, and train.py
itself runs under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.dist_worker import tiny_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(*args, nproc=2, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def worker(out, prepared, tok_path, steps, until, accum, fsdp=False, resume=False, objective="clm", dropout=0.0,
           optimizer="adamw"):
    return torchrun(os.path.join(ROOT, "tests", "dist_worker.py"), out, prepared[0], tok_path, steps, until, accum,
                    int(fsdp), int(resume), objective, dropout, optimizer)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, tokenizer):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    tokenizer.save(path)
    return path


def single_process(out, prepared, tokenizer, steps, accum, grads=None, objective="clm", optimizer="adamw"):
    """One process with `accum` micro-batches: its weights and losses after `steps` steps. With
    `grads`, also the first step's gradient computed by hand from the micro-batches that process
    makes: the summed token losses of all of them over their total count (tests/test_trainer.py),
    a reference that shares no normalization code with the objectives or the trainer."""
    from minilm.data import BlockSource
    from minilm.objectives import build_objective
    from minilm.trainer import Trainer
    from tests.test_trainer import recorded, summed_loss_and_count
    cfg = tiny_config(out, tokenizer.vocab_size, steps, accum)
    cfg.train.optimizer = optimizer
    torch.manual_seed(0)
    objective = build_objective(objective, cfg.model, tokenizer)
    train = BlockSource(prepared[0], "train", cfg.model.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    trainer = Trainer(cfg, objective, train, None, tokenizer, log=lambda *_: None)
    if grads is not None:  # the first step's gradient, before training
        made = recorded(objective)
        trainer.accumulate_gradients(0)
        del objective.make_batch                                # stop recording
        trainer.optimizer.zero_grad(set_to_none=True)
        per_batch = [summed_loss_and_count(objective, batch) for batch in made]
        (sum(loss for loss, _ in per_batch) / sum(count for _, count in per_batch)).backward()
        grads.update({n: p.grad.clone() for n, p in objective.named_parameters()})
        trainer.optimizer.zero_grad(set_to_none=True)
    history = trainer.fit()
    return objective.state_dict(), history


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("objective, optimizer", [("clm", "adamw"), ("mlm", "adamw"), ("clm", "muon")])
def test_two_processes_equal_one_process_with_twice_the_accumulation(objective, optimizer, tmp_path, prepared,
                                                                     tokenizer, tok_path):
    # clm: every micro-batch has the same number of targets; mlm: each masks a different number,
    # so only a loss normalized by the step's global count (summed over ranks) matches the
    # hand-computed gradient of one process.
    # 2 processes x 2 micro-batches against 1 process x 4: the no_sync path is in the comparison.
    out = tmp_path / "ddp"
    worker(out, prepared, tok_path, steps=5, until=5, accum=2, objective=objective, optimizer=optimizer)
    rank0, rank1 = load(out / "params-rank0.pt"), load(out / "params-rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name          # identical on both ranks
    # one gradient all-reduce per step (5 steps + the first step's gradient taken before them),
    # not one per micro-batch: no_sync held the first micro-batch's back
    assert json.load(open(out / "allreduce-rank0.json")) == 6
    ref_grads = {}
    reference, ref_history = single_process(tmp_path / "one", prepared, tokenizer, steps=5, accum=4, grads=ref_grads,
                                            objective=objective, optimizer=optimizer)
    # the gradient itself, not only the AdamW result (which barely notices a wrongly scaled gradient)
    for rank in (0, 1):
        grads = load(out / f"grads-rank{rank}.pt")
        for name, value in ref_grads.items():
            assert torch.allclose(grads[name], value, atol=1e-6, rtol=1e-4), (rank, name)
    # Muon's Newton-Schulz runs in fp32 off CUDA (minilm/muon.py), so its update is as close to one
    # process's as AdamW's (on CUDA it runs in bf16, whose roundings five iterations amplify)
    atol = 1e-5
    for name, value in reference.items():
        assert torch.allclose(rank0[name], value, atol=atol), name  # == one process, 2 micro-batches
    history = json.load(open(out / "history-rank0.json"))
    assert history == pytest.approx(ref_history, abs=atol)
    assert json.load(open(out / "history-rank1.json")) == history  # every rank reports the global loss
    # and the weights really moved (the comparison is not between two untouched initialisations)
    torch.manual_seed(0)
    from minilm.objectives import build_objective
    init = build_objective(objective, tiny_config(out, tokenizer.vocab_size, 5, 1).model, tokenizer).state_dict()
    assert not torch.allclose(init["backbone.blocks.0.attn.qkv.weight"], rank0["backbone.blocks.0.attn.qkv.weight"])


def test_simcse_negatives_from_two_processes_equal_one_process_with_the_whole_batch(tmp_path, prepared, tokenizer,
                                                                                   tok_path):
    """simcse gathers its keys across ranks (minilm.distributed.gather_with_gradient): 2 processes
    of 4 sentences each must give the gradient and the loss of one process over all 8 in one
    InfoNCE (every sentence a negative for every other), not two separate InfoNCEs of 4. Dropout
    0, so the two processes' noise cannot differ from the single one's."""
    from minilm.data import SentenceSource
    from minilm.objectives import build_objective
    out = tmp_path / "ddp"
    worker(out, prepared, tok_path, steps=1, until=1, accum=1, objective="simcse")
    cfg = tiny_config(tmp_path / "one", tokenizer.vocab_size, 1, 1)
    torch.manual_seed(0)
    objective = build_objective("simcse", cfg.model, tokenizer)
    source = SentenceSource(prepared[0], "train", cfg.model.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    parts = [source.batch(0, rank) for rank in (0, 1)]    # rank r reads micro-batch r of the step
    whole = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    loss, _ = objective(objective.make_batch(whole))
    loss.backward()
    for rank in (0, 1):
        grads = load(out / f"grads-rank{rank}.pt")
        for name, parameter in objective.named_parameters():
            assert torch.allclose(grads[name], parameter.grad, atol=1e-6, rtol=1e-4), (rank, name)
    assert json.load(open(out / "history-rank0.json"))[0] == pytest.approx(loss.item(), abs=1e-5)


def test_two_process_run_resumes_exactly(tmp_path, prepared, tok_path):
    """With dropout, seeded per rank as train.py does: each rank must get its own random state
    back from the checkpoint, not rank 0's."""
    straight = tmp_path / "straight"
    worker(straight, prepared, tok_path, steps=6, until=6, accum=2, dropout=0.1)
    stopped = tmp_path / "stopped"
    worker(stopped, prepared, tok_path, steps=6, until=3, accum=2, dropout=0.1)
    assert os.path.exists(stopped / "ckpt-00000003.pt")
    worker(stopped, prepared, tok_path, steps=6, until=6, accum=2, resume=True, dropout=0.1)
    full = json.load(open(straight / "history-rank0.json"))
    assert json.load(open(stopped / "history-rank0.json")) == full[3:]
    a, b = load(straight / "params-rank0.pt"), load(stopped / "params-rank0.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rng = {(run, rank): load(run / f"rng-rank{rank}.pt") for run in (straight, stopped) for rank in (0, 1)}
    for rank in (0, 1):
        assert torch.equal(rng[stopped, rank], rng[straight, rank]), rank
    assert not torch.equal(rng[straight, 0], rng[straight, 1])          # the ranks' noise differs


def test_fsdp_checkpoint_loads_into_one_process(tmp_path, prepared, tokenizer, tok_path):
    out = tmp_path / "fsdp"
    worker(out, prepared, tok_path, steps=3, until=3, accum=2, fsdp=True)
    sharded = load(out / "params-rank0.pt")
    from minilm.checkpoint import load_checkpoint
    from minilm.objectives import build_objective
    state = load_checkpoint(str(out / "ckpt-00000003.pt"))
    fresh = build_objective("clm", tiny_config(out, tokenizer.vocab_size, 3, 1).model, tokenizer)
    fresh.load_state_dict(state["model"])                      # plain tensors, strict keys
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, sharded[name]), name
    # FSDP (2 processes x 2 micro-batches, gradient sync on the last only) computes the same steps
    # as one process with 4 micro-batches
    ref_grads = {}
    reference, _ = single_process(tmp_path / "one", prepared, tokenizer, steps=3, accum=4, grads=ref_grads)
    grads = load(out / "grads-rank0.pt")
    for name, value in ref_grads.items():
        assert torch.allclose(grads[name], value, atol=1e-6, rtol=1e-4), name
    for name, value in reference.items():
        assert torch.allclose(sharded[name], value, atol=1e-5), name


def test_train_py_runs_under_torchrun(tmp_path, corpus_dir):
    out = tmp_path / "run"
    result = torchrun(os.path.join(ROOT, "train.py"), "--data", corpus_dir, "--out_dir", out, "--max_steps", 3,
                      "--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--seq_len", 32, "--batch_size", 2,
                      "--vocab_size", 512, "--eval_every", 3, "--eval_batches", 1, "--log_every", 1,
                      "--warmup_steps", 1, "--device", "cpu", "--threads", 1)
    # --eval_batches 1 < 2 processes: the second evaluates a padding batch that counts for nothing
    # (it once crashed there, holding no metric at all for the all-reduce)
    # one log, written by rank 0 only, that states the global batch
    assert result.stdout.count("[model]") == 1
    assert "world size 2" in result.stdout and "2 x accumulation 1 x 2 processes = 4 sequences" in result.stdout
    assert "val loss" in result.stdout
    assert os.path.exists(out / "ckpt-00000003.pt")
    from minilm.checkpoint import load_checkpoint
    assert load_checkpoint(str(out / "ckpt-00000003.pt"))["info"]["world_size"] == 2


def test_sigterm_to_torchrun_saves_a_checkpoint_on_every_rank_and_stops(tmp_path, corpus_dir):
    """A scheduler's preemption: SIGTERM to the torchrun launcher, which passes it on to both
    processes. They agree on a step (at the next logging step), rank 0 saves, both exit."""
    import signal
    import time
    from minilm.checkpoint import list_checkpoints, load_checkpoint
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--data", corpus_dir, "--out_dir", str(out), "--max_steps", "100000",
           "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--seq_len", "32", "--batch_size", "2",
           "--vocab_size", "512", "--log_every", "5", "--eval_every", "100000", "--ckpt_every", "100000",
           "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    lines, deadline = [], time.time() + 120
    try:
        for line in proc.stdout:                       # wait until training runs
            lines.append(line)
            if line.startswith("step") and "tok/s" in line or time.time() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.stdout.readlines()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    text = "".join(lines)
    assert "stopped by signal 15" in text, text[-3000:]
    saved = list_checkpoints(str(out))
    assert len(saved) == 1                             # the signal's checkpoint, nothing else was due
    state = load_checkpoint(saved[0], resumable=True)
    assert state["step"] % 5 == 0 and state["step"] >= 5 and state["info"]["world_size"] == 2


def one_process_classify_eval(out, data):
    """dist_worker.classify_eval's evaluation in this process: the same weights (seed 0), one rank."""
    from minilm.data import LabelledSource, load_meta
    from minilm.objectives import build_objective
    from minilm.tokenizer import Tokenizer
    from minilm.trainer import Trainer
    tokenizer = Tokenizer.load(os.path.join(data, "tokenizer.model"))
    cfg = tiny_config(out, tokenizer.vocab_size, 1, 1)
    cfg.obj.labels = json.dumps(load_meta(data)["labels"])
    torch.manual_seed(0)
    objective = build_objective("classify", cfg.model, tokenizer, cfg.obj)
    val = LabelledSource(data, "val", cfg.model.seq_len, cfg.train.batch_size)
    trainer = Trainer(cfg, objective, val, val, tokenizer, log=lambda *_: None)
    metrics = trainer.evaluate()
    return {"rows": list(range(len(val))), "metrics": metrics, "confusion": trainer.last_eval_sums["confusion"].tolist()}


def test_classify_evaluation_visits_every_row_once_across_processes(tmp_path, tokenizer):
    """Two processes split the labelled validation rows (batch i to rank i % 2, padding rows past
    the end): together they visit each of the 31 rows exactly once, and the all-reduced metrics
    and confusion matrix equal one process's."""
    from tests.test_classify import write_labelled
    from minilm.data import prepare_rows
    data = str(tmp_path / "data")
    prepare_rows(write_labelled(tmp_path / "train.tsv", 60, 0), tokenizer, data, columns=[("text", "--text_field")],
                 label_column="label", val_source=write_labelled(tmp_path / "val.tsv", 31, 1), num_workers=1,
                 log=lambda _: None)
    torchrun(os.path.join(ROOT, "tests", "dist_worker.py"), tmp_path / "two", data, "classify_eval")
    ranks = [json.load(open(tmp_path / "two" / f"eval-rank{r}.json")) for r in range(2)]
    one = one_process_classify_eval(tmp_path / "one", data)
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(31)) == sorted(one["rows"])
    assert ranks[0]["rows"] and ranks[1]["rows"]                   # both ranks did a share
    for r in ranks:
        assert r["confusion"] == one["confusion"] and sum(map(sum, r["confusion"])) == 31
        assert r["metrics"] == pytest.approx(one["metrics"])
