"""minilm.export (minilm/safetensors_io.py): a checkpoint's weights and config as one .safetensors file.

The file rebuilds the model bit for bit from itself alone (config and tokenizer in its metadata),
tied tensors stay tied, every dtype survives, the layout is the safetensors format's (checked by
hand here, and against the safetensors package when it is installed), bad paths are one line."""
from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import pytest
import torch

import minilm
from minilm.checkpoint import load_checkpoint, tensor_to_bytes
from minilm.config import Config, ModelConfig
from minilm.data import BlockSource
from minilm.errors import UserError
from minilm.safetensors_io import build_header, load_safetensors, main, save_safetensors
from minilm.objectives import build_objective, model_config_for, window_length_for
from minilm.tokenizer import Tokenizer
from minilm.trainer import Trainer
from tests.conftest import ROOT
from tests.test_checkpoint_files import watched_fifo

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def train_one_step(out_dir, objective_name, prepared, tokenizer) -> str:
    """A real checkpoint (weights after one AdamW step, optimizer state, tokenizer) of a tiny run."""
    cfg = Config()
    cfg.model = model_config_for(objective_name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32,
                                                              n_layer=1, n_head=2, n_embd=32))
    cfg.train.objective, cfg.train.out_dir, cfg.train.device = objective_name, str(out_dir), "cpu"
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps = 2, 1, 0
    torch.manual_seed(0)
    objective = build_objective(objective_name, cfg.model, tokenizer, cfg.obj)
    window = window_length_for(objective_name, cfg.model, cfg.obj)
    source = BlockSource(prepared[0], "train", cfg.model.seq_len, 2, seed=1, window_length=window)
    trainer = Trainer(cfg, objective, source, None, tokenizer, log=lambda *_: None)
    trainer.peak_flops = 1.0   # MFU's denominator: not measured, not checked here
    trainer.fit()
    return str(out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared, tokenizer):
    """Run folders: clm (its LM head is the tied token embedding) and t5 (encoder and decoder share
    one token embedding: two state_dict names, one storage)."""
    return {name: train_one_step(tmp_path_factory.mktemp(name), name, prepared, tokenizer) for name in ("clm", "t5")}


def rebuild(path):
    """A fresh objective built from the file alone, loaded strictly: (objective, metadata)."""
    weights, metadata = load_safetensors(path)
    cfg = Config.from_dict(json.loads(metadata["config"]))
    tokenizer = Tokenizer(base64.b64decode(metadata["tokenizer"]))
    torch.manual_seed(123)   # another initialisation than the run's: every value must come from the file
    objective = build_objective(metadata["objective"], cfg.model, tokenizer, cfg.obj)
    objective.load_state_dict(weights, strict=True)
    return objective, metadata


@pytest.mark.parametrize("name", ["clm", "t5"])
def test_the_exported_file_rebuilds_the_model_bit_for_bit(runs, tmp_path, name):
    out = str(tmp_path / "model.safetensors")
    assert minilm.export(runs[name], out) == out          # a run folder: its newest checkpoint
    saved = load_checkpoint(os.path.join(runs[name], "ckpt-00000001.pt"))
    objective, metadata = rebuild(out)
    rebuilt = objective.state_dict()
    assert rebuilt.keys() == saved["model"].keys()
    for key, tensor in saved["model"].items():
        assert rebuilt[key].dtype == tensor.dtype and torch.equal(rebuilt[key], tensor), key
    assert metadata["objective"] == name and metadata["step"] == "1" and metadata["format"] == "pt"
    assert json.loads(metadata["config"]) == saved["config"]
    assert base64.b64decode(metadata["tokenizer"]) == tensor_to_bytes(saved["tokenizer"])
    # weights only: the checkpoint also holds AdamW's two moments per weight
    n_bytes = sum(t.numel() * t.element_size() for t in objective.parameters())
    assert n_bytes < os.path.getsize(out) < n_bytes + 200_000 < os.path.getsize(saved_path(runs[name]))


def saved_path(run):
    return os.path.join(run, "ckpt-00000001.pt")


def test_a_shared_embedding_is_stored_once_and_stays_shared(runs, tmp_path):
    out = str(tmp_path / "t5.safetensors")
    minilm.export(saved_path(runs["t5"]), out)            # a checkpoint file works as well
    encoder, decoder = "backbone.encoder.tok_emb.weight", "backbone.decoder.tok_emb.weight"
    header = read_header(out)
    assert decoder in header and encoder not in header   # stored under the first name in sorted order
    weights, metadata = load_safetensors(out)
    assert json.loads(metadata["aliases"]) == {encoder: decoder}
    assert weights[decoder] is weights[encoder]
    objective, _ = rebuild(out)
    assert objective.backbone.encoder.tok_emb.weight is objective.backbone.decoder.tok_emb.weight


def read_header(path) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def test_the_header_follows_the_safetensors_layout(runs, tmp_path):
    out = str(tmp_path / "clm.safetensors")
    minilm.export(runs["clm"], out)
    data = open(out, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0 and data[8 + length - 1:8 + length] in (b"}", b" ")   # padded with spaces
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__")
    assert set(metadata) == {"format", "minilm_version", "objective", "config", "tokenizer", "step"}
    assert all(isinstance(v, str) for v in metadata.values())
    saved = load_checkpoint(saved_path(runs["clm"]))["model"]
    assert set(header) == set(saved)
    offset = 0
    for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        t = saved[name]
        assert info["dtype"] == "F32" and info["shape"] == list(t.shape)
        assert info["data_offsets"] == [offset, offset + 4 * t.numel()], name   # back to back
        assert data[8 + length + offset:8 + length + offset + 4 * t.numel()] == t.numpy().astype("<f4").tobytes()
        offset += 4 * t.numel()
    assert 8 + length + offset == len(data)


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    shared = torch.randn(5, generator=g)
    return {
        "bf16": base.to(torch.bfloat16), "f16": base.half(), "f64": base.double(), "f32": base,
        "i64": torch.arange(-6, 6).reshape(3, 4), "i32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-3, 300], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "transposed": base.t(),
        "tied.a": shared, "tied.b": shared, "slice": shared[1:3],
    }


def test_every_dtype_round_trips_exactly(tmp_path):
    tensors = every_dtype()
    path = str(tmp_path / "all.safetensors")
    save_safetensors(tensors, path, {"note": "ünïcode ok"})
    loaded, metadata = load_safetensors(path)
    assert loaded.keys() == tensors.keys() and metadata["note"] == "ünïcode ok"
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape and torch.equal(loaded[name], t), name
    assert json.loads(metadata["aliases"]) == {"tied.b": "tied.a"}   # a slice is stored as a copy
    # little-endian whatever the machine: 1.0 in bf16 is 0x3F80, in int32 1 is 01 00 00 00
    save_safetensors({"one": torch.ones(1, dtype=torch.bfloat16), "int": torch.ones(1, dtype=torch.int32)},
                     path)
    data = open(path, "rb").read()
    assert data.endswith(b"\x01\x00\x00\x00\x80\x3f")   # I32 before BF16: widest dtype first


def test_the_data_is_laid_out_widest_dtype_first_then_by_name():
    tensors = {"b": torch.ones(1), "a": torch.ones(1, dtype=torch.bfloat16), "c": torch.ones(1, dtype=torch.int64),
               "d": torch.ones(1), "e": torch.ones(1, dtype=torch.bool)}
    header, order = build_header(tensors, {})
    assert order == ["c", "b", "d", "a", "e"]
    assert header.startswith(b'{"__metadata__":{},"c":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},')


def test_bad_paths_and_bad_files_are_one_line_errors(runs, tmp_path):
    with pytest.raises(UserError, match="no checkpoint at .*nowhere; pass a checkpoint file or a run folder"):
        minilm.export(str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="no checkpoint in .*train one first"):
        minilm.export(str(tmp_path), str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="is a folder; name the file to write"):
        minilm.export(runs["clm"], str(tmp_path))
    with pytest.raises(UserError, match="no file at .*missing.safetensors"):
        load_safetensors(str(tmp_path / "missing.safetensors"))
    not_safetensors = tmp_path / "ckpt.safetensors"
    not_safetensors.write_bytes(open(saved_path(runs["clm"]), "rb").read())   # a zip, not safetensors
    with pytest.raises(UserError, match="is not a safetensors file: its header"):
        load_safetensors(str(not_safetensors))
    good = tmp_path / "good.safetensors"
    save_safetensors({"w": torch.ones(4)}, str(good))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-3])
    with pytest.raises(UserError, match="tensor 'w' .*needs bytes 0..16 but the file holds 13 data bytes"):
        load_safetensors(str(tmp_path / "cut.safetensors"))
    (tmp_path / "tail.safetensors").write_bytes(good.read_bytes() + b"xx")
    with pytest.raises(UserError, match="2 bytes past its last tensor"):
        load_safetensors(str(tmp_path / "tail.safetensors"))
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(UserError, match="the data of tensors 'a' and 'b' overlap"):
        load_safetensors(str(tmp_path / "overlap.safetensors"))
    with pytest.raises(UserError, match="expected a checkpoint .* and an output file; usage"):
        main([runs["clm"]])
    assert not list(tmp_path.glob(".tmp-*"))   # no temporary file left behind


# ----------------------------------------------------------------------------- what an export replaces
def test_an_export_never_replaces_a_checkpoint_or_a_file_it_did_not_write(runs, tmp_path):
    """Only a new path, an empty file or an earlier export is written: the checkpoint being
    exported, the run's newest checkpoint, any file named like one, the run's metrics, a file
    of the user's, and anything that is not a regular file are refused, and left as they were."""
    run = str(tmp_path / "run")
    shutil.copytree(runs["clm"], run)      # a copy: a regression must not destroy the shared run
    ckpt = os.path.join(run, "ckpt-00000001.pt")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    disguised = tmp_path / "old.safetensors"
    shutil.copy(ckpt, disguised)           # a checkpoint, whatever its name says
    fifo = str(tmp_path / "fifo")
    os.symlink(fifo, tmp_path / "link-to-fifo")
    metrics = os.path.join(run, "metrics.jsonl")
    assert os.path.exists(metrics)
    refused = [((ckpt, ckpt), "is the checkpoint being exported; writing it would destroy it: choose another "
                              "output path"),
               ((run, ckpt), "ckpt-00000001.pt is named like a checkpoint, which --resume and sample.py would try"),
               ((ckpt, os.path.join(run, "best.pt")), "best.pt is named like a checkpoint"),
               ((run, os.path.join(run, "ckpt-00000009.pt")), "ckpt-00000009.pt is named like a checkpoint"),
               ((run, metrics), "metrics.jsonl already exists and is not a safetensors file"),
               ((run, str(notes)), "notes.txt already exists and is not a safetensors file .* or delete it "
                                   "yourself first"),
               ((ckpt, str(disguised)), "old.safetensors already exists and is not a safetensors file"),
               ((run, fifo), "will not write .*fifo: it is a FIFO, not a regular file; choose another output"),
               ((run, str(tmp_path / "link-to-fifo")), "link-to-fifo: it is a FIFO, not a regular file")]
    before = {p: open(p, "rb").read() for p in (ckpt, metrics, notes, disguised)}
    with watched_fifo(fifo) as opened:
        for argv, message in refused:
            with pytest.raises(UserError, match=message) as err:
                main(list(argv))                # python -m minilm.safetensors_io SOURCE OUT
            assert "\n" not in str(err.value)
        assert not opened
    assert {p: open(p, "rb").read() for p in before} == before
    assert stat.S_ISFIFO(os.stat(tmp_path / "link-to-fifo").st_mode)
    assert sorted(os.listdir(run)) == sorted(os.listdir(runs["clm"]))    # nothing added, no temporary file
    assert minilm.export(run, str(disguised.with_name("new.safetensors")))   # what works still works


def test_an_earlier_export_or_an_empty_file_is_replaced(runs, tmp_path):
    out, empty, real = tmp_path / "model.safetensors", tmp_path / "empty.safetensors", tmp_path / "a" / "b.st"
    save_safetensors({"old": torch.ones(2)}, str(out))
    empty.touch()
    real.parent.mkdir()
    save_safetensors({"old": torch.ones(2)}, str(real))
    os.symlink(real, tmp_path / "link.safetensors")
    for path in (out, empty, tmp_path / "link.safetensors"):
        minilm.export(runs["clm"], str(path))
        assert "old" not in load_safetensors(str(path))[0]
    assert os.path.islink(tmp_path / "link.safetensors")   # the link stays, the file it names is replaced


# ----------------------------------------------------------------------------- crafted headers
def crafted(tmp_path, header, data: bytes = bytes(16), name: str = "crafted.safetensors") -> str:
    """A file with this header (a dict, or raw JSON text) and these data bytes."""
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def entry(shape=(4,), offsets=(0, 16), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def with_aliases(aliases: str, **more) -> dict:
    return {"__metadata__": {"aliases": aliases}, "w": entry(), **more}


NOT_INTEGERS = "not a list of non-negative integers"
NOT_OFFSETS = "not two non-negative integers"
CRAFTED = {
    "negative shape": ({"w": entry(shape=(-4,))}, NOT_INTEGERS),
    "float shape": ({"w": entry(shape=(4.0,))}, NOT_INTEGERS),
    "string shape": ({"w": entry(shape=("4",))}, NOT_INTEGERS),
    "bool shape": ({"w": entry(shape=(True, 4))}, NOT_INTEGERS),
    "shape is a string": ({"w": entry(shape="4")}, NOT_INTEGERS),
    "shape overflows": ({"w": entry(shape=(0, 2**40, 2**40), offsets=(0, 0)), "x": entry(offsets=(0, 16))},
                        r"shape \[0, 1099511627776, 1099511627776\], too large for any tensor"),
    "shape beyond int64": ({"w": entry(shape=(0, 2**64), offsets=(0, 0)), "x": entry()}, "too large for any tensor"),
    "negative offset": ({"w": entry(offsets=(-4, 12))}, NOT_OFFSETS),
    "float offset": ({"w": entry(offsets=(0, 16.0))}, NOT_OFFSETS),
    "string offsets": ({"w": entry(offsets=("0", "16"))}, NOT_OFFSETS),
    "bool offsets": ({"w": entry(shape=(16,), offsets=(False, 16), dtype="U8")}, NOT_OFFSETS),
    "three offsets": ({"w": entry(offsets=(0, 8, 16))}, NOT_OFFSETS),
    "end before begin": ({"w": entry(offsets=(16, 0))}, r"needs 16 bytes but its offsets 16..0 hold -16"),
    "offsets past the file": ({"w": entry(shape=(100,), offsets=(0, 400))}, "needs bytes 0..400 but the file holds 16"),
    "length is not shape x dtype": ({"w": entry(shape=(2,), offsets=(0, 16))}, "needs 8 bytes but its offsets 0..16"),
    "overlapping offsets": ({"w": entry(shape=(2,), offsets=(0, 8)), "v": entry(shape=(3,), offsets=(4, 16))},
                            "the data of tensors 'w' and 'v' overlap"),
    "a gap": ({"w": entry(shape=(2,), offsets=(8, 16))}, "8 bytes before tensor 'w' belong to no tensor"),
    "unknown dtype": ({"w": entry(dtype="F33")}, "has dtype 'F33', not one of BOOL"),
    "dtype is a list": ({"w": entry(dtype=["F32"])}, "has dtype"),
    "entry is a list": ({"w": [4, 0, 16]}, "has a malformed header entry"),
    "entry lacks offsets": ({"w": {"dtype": "F32", "shape": [4]}}, "needs dtype, shape and data_offsets"),
    "metadata value not a string": ({"__metadata__": {"format": 1}, "w": entry()}, "metadata's 'format' is a int"),
    "aliases not a string": ({"__metadata__": {"aliases": {"v": "w"}}, "w": entry()}, "'aliases' is a dict"),
    "aliases not JSON": (with_aliases("{v: w"), "aliases are not JSON"),
    "aliases not an object": (with_aliases('["v", "w"]'), "aliases are not a JSON object of names"),
    "alias target not a string": (with_aliases('{"v": ["w"]}'), "aliases are not a JSON object of names"),
    "alias to a missing tensor": (with_aliases('{"v": "u"}'), "point 'v' to 'u', which the file does not hold"),
    "alias to an alias": (with_aliases('{"v": "w", "u": "v"}'), "point 'u' to 'v', which the file does not hold"),
    "alias replaces a stored tensor": (with_aliases('{"v": "w"}', v=entry(shape=(0,), offsets=(16, 16))),
                                       "name 'v', which is also a stored tensor"),
    "deeply nested header": ("[" * 100_000 + "]" * 100_000, "its header is not JSON"),
    "5000-digit number": ('{"w": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 16]}}',
                          "its header is not JSON"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_header_is_a_one_line_error(tmp_path, case):
    header, message = CRAFTED[case]
    path = crafted(tmp_path, header)
    with pytest.raises(UserError, match=message) as err:
        load_safetensors(path)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_tensors_listed_out_of_offset_order_load(tmp_path):
    """The header is a JSON object: its order says nothing; the offsets alone place the data."""
    data = torch.tensor([1.0, 2.0]).numpy().tobytes() + torch.tensor([3.0]).numpy().tobytes()
    path = crafted(tmp_path, {"late": entry(shape=(1,), offsets=(8, 12)), "early": entry(shape=(2,), offsets=(0, 8))},
                   data)
    loaded, _ = load_safetensors(path)
    assert loaded["early"].tolist() == [1.0, 2.0] and loaded["late"].tolist() == [3.0]


# ----------------------------------------------------------------------------- which tensors are aliases
def test_only_the_same_view_of_one_storage_is_stored_as_an_alias(tmp_path):
    """Equal-shape views at other offsets of one storage, a conjugated or negated view (the same
    memory, other values) and a reshaped view are distinct tensors; the same view is one."""
    t = torch.arange(8.)
    c = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    tensors = {"a": t[:4], "b": t[4:], "same_as_a": t[:4], "reshaped": t[:4].view(2, 2), "strided": t[::2],
               "c": c, "c_conj": c.conj(), "imag": c.imag, "neg_imag": c.conj().imag}
    path = str(tmp_path / "views.safetensors")
    save_safetensors(tensors, path)
    loaded, metadata = load_safetensors(path)
    assert json.loads(metadata["aliases"]) == {"same_as_a": "a"}
    for name, expected in tensors.items():
        assert torch.equal(loaded[name], expected.resolve_conj().resolve_neg()), name
    assert loaded["same_as_a"] is loaded["a"] and loaded["b"].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_the_command_line_and_a_light_import(runs, tmp_path):
    """python -m minilm.safetensors_io end to end, and `import minilm` without torch (export
    imports what it needs when called)."""
    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-m", "minilm.safetensors_io", runs["t5"], str(out)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith(f"wrote {out} (") and out.exists()
    light = subprocess.run([sys.executable, "-c", "import sys, minilm, minilm.config; "
                            "assert 'torch' not in sys.modules; print(minilm.__all__)"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert light.returncode == 0 and light.stdout.strip() == "['explain', 'export', 'load']", light.stderr
    assert callable(minilm.export)


# ----------------------------------------------------------------------------- the safetensors package
def test_the_safetensors_package_reads_and_writes_the_same_file(runs, tmp_path):
    """Skipped unless `safetensors` is installed (minilm does not depend on it)."""
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open
    out = str(tmp_path / "t5.safetensors")
    minilm.export(runs["t5"], out)
    ours, metadata = load_safetensors(out)
    theirs = st.load_file(out)
    assert theirs.keys() == ours.keys() - set(json.loads(metadata["aliases"]))
    for name, t in theirs.items():
        assert t.dtype == ours[name].dtype and torch.equal(t, ours[name]), name
    with safe_open(out, "pt") as f:
        assert f.metadata() == metadata
    # what the package writes: the same bytes. It keeps metadata in a hash map, so with several
    # keys only their order may differ: compare headers as JSON and the data as bytes.
    stored = {k: v for k, v in ours.items() if k in theirs}
    mine, written = open(out, "rb").read(), st.save(stored, metadata=metadata)
    assert mine[:8] == written[:8] and read_header_bytes(mine) == read_header_bytes(written)
    assert mine[8 + struct.unpack("<Q", mine[:8])[0]:] == written[8 + struct.unpack("<Q", written[:8])[0]:]
    # every dtype, one metadata key: byte for byte
    tensors = {k: v for k, v in every_dtype().items() if k not in ("tied.b", "slice")}
    save_safetensors(tensors, str(tmp_path / "all.safetensors"), {"format": "pt"})
    assert open(tmp_path / "all.safetensors", "rb").read() == st.save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    loaded, _ = load_safetensors(str(tmp_path / "all.safetensors"))
    theirs = st.load_file(str(tmp_path / "all.safetensors"))
    assert all(torch.equal(theirs[k], loaded[k]) and theirs[k].dtype == loaded[k].dtype for k in tensors)


def read_header_bytes(data: bytes) -> dict:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])
