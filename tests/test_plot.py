"""python -m minilm.plot (minilm/plot.py) and --tensorboard (minilm/trainer.py): the curves come
from exactly the rows trainer.py writes, against the tokens seen; a missing matplotlib or
tensorboard is one line saying how to install it. The drawing and the TensorBoard events are
checked only where those optional packages are installed."""
from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import torch

from minilm.cli import run_cli
from minilm.config import Config, ModelConfig, parse_overrides
from minilm.data import BlockSource
from minilm.errors import UserError
from minilm.objectives import build_objective, model_config_for
from minilm.plot import MATPLOTLIB_HINT, curves, main, plot_runs, read_metrics
from minilm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_trainer(out_dir, objective_name, prepared, tokenizer, **train) -> Trainer:
    """4 steps of a tiny model, a log row every step, a validation every 2 steps."""
    cfg = Config()
    cfg.model = model_config_for(objective_name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32,
                                                              n_layer=1, n_head=2, n_embd=32))
    cfg.train.objective, cfg.train.out_dir, cfg.train.device = objective_name, str(out_dir), "cpu"
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps = 2, 4, 2
    cfg.train.log_every, cfg.train.eval_every, cfg.train.eval_batches = 1, 2, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(0)
    objective = build_objective(objective_name, cfg.model, tokenizer, cfg.obj)
    folder = prepared[0]
    trainer = Trainer(cfg, objective, BlockSource(folder, "train", 32, 2, seed=1), BlockSource(folder, "val", 32, 2),
                      tokenizer, log=lambda *_: None)
    trainer.peak_flops = 1.0   # MFU's denominator: not measured, not checked here
    return trainer


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, prepared, tokenizer):
    """A causal LM and a masked LM, trained through the real Trainer: their metrics.jsonl."""
    runs = []
    for name in ("clm", "mlm"):
        out = tmp_path_factory.mktemp(f"run-{name}")
        tiny_trainer(out, name, prepared, tokenizer).fit()
        runs.append(str(out))
    return runs


def rows_of(run):
    return [json.loads(line) for line in open(f"{run}/metrics.jsonl")]


def test_every_metrics_row_carries_the_tokens_seen(two_runs):
    for run in two_runs:
        rows = rows_of(run)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
        assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
        assert all(r["tokens"] == r["step"] * 2 * 32 for r in rows)   # batch 2 x seq_len 32 per step


def test_curves_are_the_rows_against_tokens_one_per_run(two_runs):
    notes = []
    x_key, panels = curves({"clm": read_metrics(two_runs[0]), "mlm": read_metrics(two_runs[1])}, notes.append)
    assert x_key == "tokens" and notes == []
    for name, run in zip(("clm", "mlm"), two_runs):
        rows = rows_of(run)
        train, val = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
        assert panels["training loss"][name] == ([r["tokens"] for r in train], [r["loss"] for r in train])
        assert panels["learning rate"][name] == ([r["tokens"] for r in train], [r["lr"] for r in train])
        assert panels["validation loss"][name] == ([64 * 2, 64 * 4], [r["val_loss"] for r in val])
        assert panels["validation bits per byte"][name] == ([128, 256], [r["val_bpb"] for r in val])


def test_what_a_run_lacks_is_left_out_and_said(tmp_path):
    """A run whose objective reports no bpb is missing from that panel only; a step logged twice
    keeps its last value; files from before the tokens column are plotted against steps."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "metrics.jsonl").write_text(
        '{"step": 2, "tokens": 20, "loss": 3.0, "lr": 0.1}\n{"step": 1, "tokens": 10, "loss": 5.0, "lr": 0.2}\n'
        '{"step": 2, "tokens": 20, "loss": 4.0, "lr": 0.1}\n{"step": 2, "tokens": 20, "val_loss": 4.5}\nnot json\n')
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0, "lr": 0.3}\n')
    notes = []
    rows = read_metrics(str(tmp_path / "a"), notes.append)
    assert len(rows) == 4 and notes == [f"note: {tmp_path / 'a' / 'metrics.jsonl'}: skipped 1 line(s) that are "
                                        "not metrics rows"]
    notes.clear()
    x_key, panels = curves({"a": rows}, notes.append)
    assert x_key == "tokens" and panels["training loss"]["a"] == ([10, 20], [5.0, 4.0])
    assert panels["validation loss"]["a"] == ([20], [4.5]) and panels["validation bits per byte"] == {}
    assert notes == ["note: a has no val_bpb (its objective does not report it, or it never evaluated); left out "
                     "of 'validation bits per byte'"]
    notes.clear()
    x_key, panels = curves({"a": rows, "b": read_metrics(str(tmp_path / "b"))}, notes.append)
    assert x_key == "step" and panels["training loss"]["a"] == ([1, 2], [5.0, 4.0])
    assert notes[0] == "note: b predate(s) the tokens column of metrics.jsonl; plotting against steps"


def test_rows_with_null_tokens_or_invalid_utf8_are_skipped_and_counted(tmp_path):
    """A row whose tokens are null, or a line that is not UTF-8, is no metrics row: skipped and
    counted like a line that is not JSON, and the other rows still make their curves."""
    (tmp_path / "metrics.jsonl").write_bytes(
        b'{"step": 1, "tokens": 10, "loss": 5.0, "lr": 0.2}\n{"step": 2, "tokens": null, "loss": 4.5, "lr": 0.2}\n'
        b'{"step": 3, "tokens": 30, "loss": 4.0, "note": "\xff\xfe"}\n{"step": 4, "tokens": 40, "loss": 3.0}\n')
    notes = []
    rows = read_metrics(str(tmp_path), notes.append)
    assert [row["step"] for row in rows] == [1, 4]
    assert notes == [f"note: {tmp_path / 'metrics.jsonl'}: skipped 2 line(s) that are not metrics rows"]
    x_key, panels = curves({"a": rows}, notes.append)
    assert x_key == "tokens" and panels["training loss"]["a"] == ([10, 40], [5.0, 3.0])


def test_bad_command_lines_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"name at least one run folder; usage: python -m minilm.plot"):
        main(["-o", "x.png"])
    with pytest.raises(UserError, match="unknown flag --log; usage"):
        main(["out", "--log"])
    with pytest.raises(UserError, match="-o needs a file name"):
        main(["out", "-o"])
    with pytest.raises(UserError, match=f"{tmp_path} holds no metrics.jsonl; pass the --out_dir of a train.py run"):
        main([str(tmp_path)])
    with pytest.raises(UserError, match="no run folder or metrics.jsonl at nowhere"):
        main(["nowhere"])


def test_without_matplotlib_the_command_says_how_to_get_it(two_runs, tmp_path, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)   # `import matplotlib...` now raises ImportError
    with pytest.raises(UserError) as err:
        plot_runs(two_runs, str(tmp_path / "x.png"))
    assert str(err.value) == MATPLOTLIB_HINT == 'minilm.plot needs matplotlib: pip install -e ".[plot]" (or pip ' \
                                                'install matplotlib)'
    monkeypatch.setattr(sys, "argv", ["plot", *two_runs, "-o", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit) as stop:
        run_cli(main)
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {MATPLOTLIB_HINT}\n"
    assert not (tmp_path / "x.png").exists()


def test_two_runs_are_drawn_into_one_picture(two_runs, tmp_path):
    """Skipped unless matplotlib is installed (pip install -e ".[plot]")."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main([*two_runs, "-o", str(out)])
    assert stdout.getvalue() == f"wrote {out} (2 runs)\n"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    figure = plot_runs(two_runs, str(tmp_path / "curves.pdf"))   # the extension picks the format
    assert (tmp_path / "curves.pdf").read_bytes()[:5] == b"%PDF-"
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["training loss", "validation loss", "validation bits per byte", "learning rate"]
    names = [run.rstrip("/").rsplit("/", 1)[1] for run in two_runs]
    for axes, key in zip(figure.axes, ("loss", "val_loss", "val_bpb", "lr")):
        assert axes.get_xlabel() == "tokens seen"
        lines = {line.get_label(): line for line in axes.get_lines()}
        assert set(lines) == set(names)
        for name, run in zip(names, two_runs):
            rows = [r for r in rows_of(run) if key in r]
            assert list(lines[name].get_xdata()) == [r["tokens"] for r in rows]
            assert list(lines[name].get_ydata()) == [r[key] for r in rows]
    assert [text.get_text() for text in figure.legends[0].get_texts()] == names
    with pytest.raises(UserError, match=r"cannot write .*curves.xyz: .*; use .png, .pdf or .svg"):
        plot_runs(two_runs, str(tmp_path / "curves.xyz"))


# ----------------------------------------------------------------------------- --tensorboard
def test_tensorboard_without_the_package_is_one_line_before_training(tmp_path, prepared, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r'^--tensorboard needs the tensorboard package: pip install tensorboard '
                                        r'\(or pip install -e "\.\[tensorboard\]"\), or leave out --tensorboard$'):
        tiny_trainer(tmp_path, "clm", prepared, tokenizer, tensorboard=True)
    assert not (tmp_path / "tensorboard").exists()
    # train.py finds out when it parses its flags, before preparing any data
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"^--tensorboard needs the tensorboard package: pip install tensorboard"):
        parse_overrides(["--tensorboard", "--max_steps", "10", "--warmup_steps", "1"])
    assert parse_overrides(["--tensorboard", "false"]).train.tensorboard is False


def test_tensorboard_logs_every_metrics_row(tmp_path, prepared, tokenizer):
    """Skipped unless tensorboard is installed (pip install -e ".[tensorboard]")."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tiny_trainer(tmp_path, "clm", prepared, tokenizer, tensorboard=True).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = rows_of(tmp_path)
    for key in ("loss", "lr", "mfu", "tokens_per_s", "val_loss", "val_bpb"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows if key in r]   # stored as float32
        assert logged == expected, key
    assert "step" not in events.Tags()["scalars"] and "tokens" not in events.Tags()["scalars"]
