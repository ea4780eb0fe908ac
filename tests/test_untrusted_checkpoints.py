"""Checkpoints as untrusted input (minilm/checkpoint_checks.py): a crafted or damaged file is one
line naming what is wrong, on every path that loads one (sample.py, minilm.load, --init_from,
--resume), found before any model is built on a real device; every objective's own checkpoints
still load."""
from __future__ import annotations

import math
import os

import pytest
import torch

import minilm
import minilm.api
from minilm import model
from minilm.checkpoint import bytes_to_tensor, load_checkpoint
from minilm.config import Config, ModelConfig
from minilm.errors import UserError
from minilm.objectives import OBJECTIVES, build_objective, model_config_for
from tests.conftest import run_in_process
from tests.test_cli import TINY, assert_user_error

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")   # conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    """A tiny clm run's checkpoint, through the real command line: (path, its state)."""
    out = tmp_path_factory.mktemp("run")
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--max_steps", 2,
                            "--eval_every", 2, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    path = out / "ckpt-00000002.pt"
    return path, torch.load(path, weights_only=True), corpus_dir


def crafted(state: dict, tmp_path, change) -> str:
    """A copy of the checkpoint `state`, changed by change(state), saved under tmp_path."""
    state = {**state, "config": {k: dict(v) for k, v in state["config"].items()}, "model": dict(state["model"])}
    change(state)
    path = str(tmp_path / "crafted.pt")
    torch.save(state, path)
    return path


def set_model(**fields):
    return lambda state: state["config"]["model"].update(fields)


def nan_weight(state):
    key = next(k for k in state["model"] if k.endswith("tok_emb.weight"))
    state["model"][key] = torch.full_like(state["model"][key], math.nan)


CRAFTED = {   # name: (change, fragments of the one-line error)
    "10000 layers": (set_model(n_layer=10000), ["10000 blocks", "tensors"]),
    "n_embd 2**18": (set_model(n_embd=2 ** 18), ["n_embd 262144 exceeds"]),
    "n_embd 64": (set_model(n_embd=64), ["do not fit the clm model", "is [512, 32], the config implies [512, 64]"]),
    "seq_len 10**9": (set_model(seq_len=10 ** 9), ["seq_len 1000000000", "rotary"]),
    "intermediate_size 10**30": (set_model(intermediate_size=10 ** 30), ["intermediate_size 10000000000", "exceeds"]),
    "n_segment 10**30": (set_model(n_segment=10 ** 30), ["n_segment", "exceeds"]),
    "learned seq_len 10**30": (set_model(position="learned", seq_len=10 ** 30), ["seq_len", "exceeds"]),
    "learned positions": (set_model(position="learned"), ["pos_emb.weight is missing"]),
    "vocab_size off": (set_model(vocab_size=600), ["tokenizer has 512 ids", "vocab_size 600"]),
    "n_layer '2'": (set_model(n_layer="2"), ["n_layer", "integer", "'2'"]),
    "n_layer 2.5": (set_model(n_layer=2.5), ["n_layer", "integer", "2.5"]),
    "n_layer True": (set_model(n_layer=True), ["n_layer", "integer", "True"]),
    "n_layer 0": (set_model(n_layer=0), ["n_layer", ">= 1"]),
    "n_head 3": (set_model(n_head=3), ["divisible by n_head"]),
    "unknown field": (set_model(n_kv_head=2), ["unknown field 'n_kv_head'"]),
    "unknown section": (lambda s: s["config"].update(extra={}), ["unknown section 'extra'"]),
    "model section a list": (lambda s: s["config"].update(model=[1, 2]), ["'model' section is list"]),
    "model section a str": (lambda s: s["config"].update(model="big"), ["'model' section is str"]),
    "model section None": (lambda s: s["config"].update(model=None), ["'model' section is NoneType"]),
    "objective 5": (lambda s: s.update(objective=5), ["'objective' is int"]),
    "objective unknown": (lambda s: s.update(objective="gpt"), ["unknown --objective 'gpt'"]),
    "objective of another model": (lambda s: s.update(objective="mlm"), ["do not fit the mlm model"]),
    "weights a list": (lambda s: s.update(model=[1, 2]), ["'model' is list"]),
    "weights empty": (lambda s: s.update(model={}), ["'model' is empty"]),
    "a weight not a tensor": (lambda s: s["model"].update({"backbone.norm.weight": [1.0]}), ["maps", "list"]),
    "a weight missing": (lambda s: s["model"].pop("backbone.norm.weight"), ["backbone.norm.weight is missing"]),
    "a weight extra": (lambda s: s["model"].update(extra=torch.zeros(2)), ["extra is not part of the model"]),
    "tokenizer floats": (lambda s: s.update(tokenizer=s["tokenizer"].float()), ["tokenizer is a torch.float32"]),
    "tokenizer garbage": (lambda s: s.update(tokenizer=torch.arange(200, dtype=torch.uint8)),
                          ["tokenizer does not load"]),
    "step a string": (lambda s: s.update(step="2"), ["'step' is str"]),
    "step True": (lambda s: s.update(step=True), ["'step' is bool"]),
    "step negative": (lambda s: s.update(step=-1), ["step is -1"]),
    "rng garbage": (lambda s: s.update(rng=[{"cpu": "x"}]), ["'rng'"]),
    "NaN weights": (nan_weight, ["NaN or infinite", "tok_emb.weight"]),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_checkpoint_is_one_line_naming_the_file(trained, tmp_path, case):
    change, fragments = CRAFTED[case]
    path = crafted(trained[1], tmp_path, change)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(path), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture
def real_builds(monkeypatch):
    """The devices Transformers are built on while the test runs (meta builds cost nothing)."""
    devices = []
    init = model.Transformer.__init__

    def recording(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)
        init(self, *args, **kwargs)
    monkeypatch.setattr(model.Transformer, "__init__", recording)
    return devices


QUICK = ["--batch_size", "4", "--eval_batches", "1", "--warmup_steps", "1", "--device", "cpu", "--threads", "1"]
LOADERS = {   # (checkpoint, a new out_dir, the data it trained on) -> the command's result
    "sample.py": lambda path, out, data: run_in_process("sample.py", "--ckpt", path, "--prompt", "The",
                                                        "--max_new_tokens", 2, "--device", "cpu"),
    "--init_from": lambda path, out, data: run_in_process("train.py", "--init_from", path, "--data", data,
                                                          "--out_dir", out, "--max_steps", 1, *QUICK),
    "--resume": lambda path, out, data: run_in_process("train.py", "--resume", path, "--out_dir", out,
                                                       "--max_steps", 3),
}


@pytest.mark.parametrize("case", ["10000 layers", "n_embd 2**18", "n_embd 64", "seq_len 10**9",
                                  "model section a list", "NaN weights"])
@pytest.mark.parametrize("loader", [*LOADERS, "minilm.load"])
def test_every_path_that_loads_a_checkpoint_refuses_it_before_building_a_model(trained, tmp_path, real_builds,
                                                                               loader, case):
    change, fragments = CRAFTED[case]
    path = crafted(trained[1], tmp_path, change)
    if loader == "minilm.load":
        with pytest.raises(UserError) as err:
            minilm.load(path, device="cpu")
        assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)
    else:
        assert_user_error(LOADERS[loader](path, tmp_path / "out", trained[2]), path, *fragments)
    assert "cpu" not in real_builds   # refused before any model was built with memory


@pytest.mark.parametrize("loader", [*LOADERS, "minilm.load"])
def test_the_checkpoint_as_written_still_loads_on_every_path(trained, tmp_path, real_builds, loader):
    path = crafted(trained[1], tmp_path, lambda state: None)
    if loader == "minilm.load":
        assert minilm.load(path, device="cpu").generate("The", max_new_tokens=2)
    else:
        result = LOADERS[loader](path, tmp_path / "out", trained[2])
        assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu" in real_builds   # what the refusals above are checked against: a real build is seen


OWN_CHECKPOINTS = [*OBJECTIVES, "mlm+sop", "mlm+tlm", "clm+mlm", "rtd+sop"]


@pytest.mark.parametrize("name", OWN_CHECKPOINTS)
def test_every_objectives_own_checkpoint_passes_the_checks(tokenizer, tmp_path, name):
    """No false alarm: the model each objective builds is the model its saved config describes."""
    cfg = Config()
    cfg.model = model_config_for(name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=16, n_layer=2,
                                                   n_head=2, n_embd=16))
    cfg.train.objective = name
    if name == "classify":
        from minilm.objectives.classify import resolve_options
        cfg.obj.labels = '["no", "yes"]'
        cfg.obj = resolve_options(cfg.obj)
    objective = build_objective(name, cfg.model, tokenizer, cfg.obj)
    path = str(tmp_path / "own.pt")
    torch.save({"config": cfg.to_dict(), "objective": name, "model": objective.state_dict(), "step": 0,
                "tokenizer": bytes_to_tensor(tokenizer.model_bytes)}, path)
    assert set(load_checkpoint(path)["model"]) == set(objective.state_dict())


def test_a_run_folder_skips_a_bad_newest_checkpoint_for_the_one_before(trained, tmp_path):
    """sample.py and minilm.load on a folder: a refused newest file is skipped with a note."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(trained[1], folder / "ckpt-00000002.pt")
    bad = crafted(trained[1], tmp_path, nan_weight)
    os.replace(bad, folder / "ckpt-00000003.pt")
    notes = []
    model_ = minilm.api.load(str(folder), device="cpu", log=notes.append)
    assert model_.generate("The", max_new_tokens=2)
    assert len(notes) == 1 and "skipping" in notes[0] and "ckpt-00000003.pt" in notes[0] and "NaN" in notes[0]
