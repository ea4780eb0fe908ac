"""--config run.toml: a TOML file of settings, read into the same flags the command line gives
(minilm/config.py, read_config_file), so flags override it and its values get the flags' checks."""
from __future__ import annotations

import sys

import pytest

from minilm.checkpoint import load_checkpoint
from minilm.config import Config, explicit_flags, parse_overrides, read_config_file, setting_origins
from minilm.errors import UserError
from tests.conftest import run_in_process
from tests.test_cli import TINY, assert_user_error

pytestmark = pytest.mark.usefixtures("peak_flops_once")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_top_level_keys_and_tables_set_fields_and_the_preset_fills_first(tmp_path):
    path = write(tmp_path, 'preset = "tiny"\nobjective = "mlm"\nseed = 7\n'
                           '[model]\nn_layer = 3\ndropout = 0.1\nbias = true\n'
                           '[data]\ndata = "corpus.txt"\ntext_field = "body"\n[train]\nlr = 1e-3\nmin_lr = 0\n')
    cfg = parse_overrides(["--config", path])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.seq_len) == (3, 128, 128)   # tiny, then n_layer
    assert (cfg.model.dropout, cfg.model.bias) == (0.1, True)
    assert (cfg.train.objective, cfg.train.seed, cfg.train.lr, cfg.train.min_lr) == ("mlm", 7, 1e-3, 0.0)
    assert (cfg.data.data, cfg.data.text_field) == ("corpus.txt", "body")   # `data`: the section and its field
    # everything else stays at its default
    default = Config()
    assert (cfg.train.batch_size, cfg.model.mlp, cfg.data.val_fraction) == \
        (default.train.batch_size, default.model.mlp, default.data.val_fraction)


def test_flags_on_the_command_line_override_the_file_wherever_they_stand(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1e-3\nbatch_size = 4\n[model]\nn_layer = 3\n")
    for argv in (["--config", path, "--lr", "5e-4", "--preset", "small"],
                 ["--lr=5e-4", "--preset", "small", f"--config={path}"]):
        cfg = parse_overrides(argv)
        assert cfg.train.lr == 5e-4            # the flag, over the file
        assert cfg.train.batch_size == 4       # the file, over the default
        assert cfg.model.n_layer == 3          # the file's field, over the command line's preset
        assert cfg.model.n_embd == 384         # the preset fills what nobody set


def test_the_file_settings_count_as_given_flags(tmp_path):
    """train.py fills the objective's own defaults (classify's lr, simcse's dropout) only where the
    flags leave a field out: a field the file sets is given."""
    path = write(tmp_path, 'preset = "tiny"\n[train]\nlr = 1e-3\nseed = 5\n')
    argv = ["--config", path, "--seed", "3"]
    assert explicit_flags(argv) == {"config", "preset", "lr", "seed"}
    cfg = parse_overrides(argv)
    cfg.model.embed_norm = True   # as an objective's own default would
    assert setting_origins(argv, cfg) == (
        "settings other than the defaults: n_layer=2 (--preset tiny), n_embd=128 (--preset tiny), "
        f"embed_norm=True (resolved), lr=0.001 ({path}), seed=3 (command line)")


BAD_FILES = [
    ("lrr = 1e-3\n", "unknown key 'lrr'; did you mean lr?"),
    ("[trian]\nlr = 1e-3\n", "unknown table [trian]; did you mean [train]?"),
    ("[train]\nlrr = 1e-3\n", "[train] has no field 'lrr'; did you mean lr?"),
    ("[model]\nlr = 1e-3\n", "[model] has no field lr: it belongs in [train]"),
    ('lr = "fast"\n', "lr expects a number, got 'fast'"),
    ("n_layer = 2.5\n", "n_layer expects an integer, got 2.5"),
    ("n_layer = true\n", "n_layer expects an integer, got true"),
    ("compile = 1\n", "compile expects true or false, got 1"),
    ("lr = 1e-3\n[train]\nlr = 2e-3\n", "sets lr twice (the top level and [train])"),
    ("model = 3\n", "model is a section: write its fields under a [model] table"),
    ("lr = \n", "is not valid TOML"),
    ("lr = -1.0\n", "--lr must be > 0, got -1.0"),                # the flags' own range check
    ('preset = "huge"\n', "unknown --preset 'huge'"),
]


@pytest.mark.parametrize("text,message", BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        parse_overrides(["--config", path])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_missing_file_and_two_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_overrides(["--config", str(tmp_path / "nope.toml")])
    path = write(tmp_path, "seed = 1\n")
    with pytest.raises(UserError, match="--config was given 2 times"):
        parse_overrides(["--config", path, "--config", path])


def test_without_tomllib_it_says_to_use_python_311_or_flags(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: one line saying what to do instead, not an ImportError."""
    path = write(tmp_path, "seed = 1\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)   # `import tomllib` now fails as on 3.10
    with pytest.raises(UserError, match=r"use Python 3\.11\+ or give the settings as flags"):
        read_config_file(path)


def test_train_py_runs_from_a_file_and_says_where_settings_came_from(tmp_path, corpus_dir):
    """The whole path: the file's model shape and step count reach the checkpoint, the command
    line's seed wins over the file's, and the log names the file's settings."""
    path = write(tmp_path, f'data = "{corpus_dir}"\nout_dir = "{tmp_path / "run"}"\n'
                           "[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\nseq_len = 32\nvocab_size = 512\n"
                           "[train]\nmax_steps = 3\nbatch_size = 4\nwarmup_steps = 1\neval_every = 3\n"
                           'eval_batches = 1\nseed = 5\ndevice = "cpu"\nthreads = 1\n')
    result = run_in_process("train.py", "--config", path, "--seed", "9")
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("settings other than the defaults"))
    assert f"n_layer=1 ({path})" in line and "seed=9 (command line)" in line and "device=cpu" in line
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt-00000003.pt"), map_location="cpu")
    assert ckpt["config"]["model"]["n_layer"] == 1 and ckpt["config"]["model"]["n_embd"] == 32
    assert ckpt["config"]["train"]["seed"] == 9 and ckpt["step"] == 3


def test_train_py_rejects_an_unknown_key_before_any_work(tmp_path):
    path = write(tmp_path, "[train]\nmax_step = 3\n")
    result = run_in_process("train.py", "--config", path, *TINY, "--out_dir", tmp_path / "out")
    assert_user_error(result, "run.toml: [train] has no field 'max_step'; did you mean max_steps?")
    assert not (tmp_path / "out").exists()


def test_the_readmes_example_file_parses(tmp_path):
    import os
    from tests.conftest import ROOT
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    path = write(tmp_path, readme.split("```toml\n")[1].split("```")[0])
    cfg = parse_overrides(["--config", path])
    assert (cfg.train.objective, cfg.train.epochs, cfg.train.early_stopping_patience) == ("classify", 3, 2)
    assert (cfg.data.data, cfg.model.n_layer, cfg.model.dropout) == ("train.tsv", 6, 0.1)


def test_an_arch_in_the_file_fills_its_fields_and_counts_as_given(tmp_path):
    """`arch` is a key of the file like `preset`: it sets the arch's fields, a flag still wins, and
    its fields count as given, so an objective's defaults cannot undo them."""
    from minilm.config import ARCHES, explicit_flags, parse_overrides
    path = tmp_path / "run.toml"
    path.write_text('arch = "gpt2"\n[model]\nn_layer = 3\n')
    cfg = parse_overrides(["--config", str(path), "--norm_eps", "1e-6"])
    assert cfg.model.mlp == "gelu_tanh" and cfg.model.position == "learned" and cfg.model.n_layer == 3
    assert cfg.model.norm_eps == 1e-6            # the command line overrides the arch from the file
    assert set(ARCHES["gpt2"]) <= explicit_flags(["--config", str(path)])
