"""minilm/config.py: every flag value is checked when the command line is parsed, before any
work, and a bad one is a one-line UserError naming the flag, the value and what is allowed.
Also the two checkpoint-loading messages that reach users (missing file, refused pickle) and
`train.py --help`, which prints every field's meaning."""
from __future__ import annotations

import pickle

import pytest
import torch

from minilm.checkpoint import load_checkpoint
from minilm.config import PRESETS, Config, ModelConfig, help_text, parse_overrides
from minilm.errors import UserError
from tests.conftest import load_script, run_in_process
from tests.test_cli import TINY, assert_user_error, run

# (flags, the message they must give). Each rule of config.py has a case; the first group is the
# audit's list of values that gave a traceback, or were accepted and did nothing sensible.
BAD_FLAGS = [
    # tracebacks before
    (["--n_head", "0"], r"^--n_head must be >= 1, got 0$"),
    (["--eval_every", "0"], r"^--eval_every must be >= 1, got 0$"),
    (["--log_every", "0"], r"^--log_every must be >= 1, got 0$"),
    (["--ckpt_every", "0"], r"^--ckpt_every must be >= 1, got 0$"),
    (["--grad_accum", "0"], r"^--grad_accum must be >= 1, got 0$"),
    (["--threads", "-1"], r"^--threads must be >= 0, got -1$"),
    (["--lr", "-1"], r"^--lr must be > 0, got -1.0$"),
    (["--lr", "nan"], r"^--lr must be a finite number > 0, got nan$"),
    (["--beta1", "1.5"], r"^--beta1 must be in \[0, 1\), got 1.5$"),
    (["--intermediate_size", "-1"], r"^--intermediate_size must be >= 0, got -1$"),
    # accepted silently before
    (["--batch_size", "0"], r"^--batch_size must be >= 1, got 0$"),
    (["--max_steps", "-5"], r"^--max_steps must be >= 0, got -5$"),
    (["--eval_batches", "0"], r"^--eval_batches must be >= 1, got 0$"),
    (["--warmup_steps", "-10"], r"^--warmup_steps must be >= 0, got -10$"),
    (["--grad_clip", "-1"], r"^--grad_clip must be >= 0, got -1.0$"),
    (["--max_steps", "50", "--warmup_steps", "100"], r"^--warmup_steps must be at most --max_steps \(50\), got 100: .*"
                            r"pass --warmup_steps 50 or less$"),
    # caught only when warmup ended, after a checkpoint was written
    (["--schedule", "bogus"], r"^--schedule must be one of cosine, linear, constant, wsd, got 'bogus'$"),
    # counts
    (["--n_layer", "0"], "--n_layer must be >= 1"),
    (["--n_embd", "-4"], "--n_embd must be >= 1"),
    (["--seq_len", "0"], "--seq_len must be >= 1"),
    (["--vocab_size", "0"], "--vocab_size must be >= 1"),
    (["--n_segment", "-1"], "--n_segment must be >= 0"),
    (["--keep_checkpoints", "-1"], "--keep_checkpoints must be >= 0"),
    (["--num_workers", "-2"], "--num_workers must be >= 0"),
    (["--tokenizer_sample_lines", "0"], "--tokenizer_sample_lines must be >= 1"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*64\), got -1"),
    (["--seed", str(2 ** 64)], r"--seed must be in \[0, 2\*\*64\)"),
    # floats: ranges, and nan / inf everywhere
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--min_lr", "-0.1"], "--min_lr must be >= 0, got -0.1"),
    (["--min_lr", "0.01"], r"--min_lr must be at most --lr \(0.002\), got 0.01"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--weight_decay", "nan"], "--weight_decay must be a finite number >= 0, got nan"),
    (["--beta1", "-0.1"], r"--beta1 must be in \[0, 1\)"),
    (["--beta2", "1"], r"--beta2 must be in \[0, 1\), got 1.0"),
    (["--grad_clip", "inf"], "--grad_clip must be a finite number >= 0, got inf"),
    (["--dropout", "1"], r"--dropout must be in \[0, 1\), got 1.0"),
    (["--dropout", "nan"], r"--dropout must be a finite number in \[0, 1\)"),
    (["--rope_base", "1"], "--rope_base must be > 1, got 1.0"),
    (["--norm_eps", "0"], "--norm_eps must be > 0, got 0.0"),
    (["--character_coverage", "0"], r"--character_coverage must be in \(0, 1\], got 0.0"),
    (["--character_coverage", "1.5"], r"--character_coverage must be in \(0, 1\]"),
    (["--val_fraction", "0"], r"--val_fraction must be in \(0, 1\), got 0.0"),
    (["--val_fraction", "1"], r"--val_fraction must be in \(0, 1\), got 1.0"),
    (["--mask_prob", "0"], r"--mask_prob must be in \(0, 1\], got 0.0"),
    (["--mask_prob", "nan"], r"--mask_prob must be a finite number in \(0, 1\]"),
    (["--mask_replace_prob", "1.2"], r"--mask_replace_prob must be in \[0, 1\]"),
    (["--random_replace_prob", "-0.1"], r"--random_replace_prob must be in \[0, 1\]"),
    (["--mask_replace_prob", "0.9", "--random_replace_prob", "0.2"],
     r"--mask_replace_prob \+ --random_replace_prob must be at most 1, got 0.9 \+ 0.2"),
    (["--span_geometric_p", "0"], r"--span_geometric_p must be in \(0, 1\]"),
    (["--span_min_words", "0"], "--span_min_words must be >= 1"),
    (["--span_min_words", "5", "--span_max_words", "2"], "--span_min_words <= --span_max_words, got 5 and 2"),
    # choices
    (["--dtype", "fp64"], "--dtype must be one of auto, fp32, bf16, fp16, got 'fp64'"),
    (["--on_nan", "retry"], "--on_nan must be one of stop, rollback, got 'retry'"),
    (["--sentence_task", "nextsent"], "--sentence_task must be one of sop, nsp"),
    (["--mlp", "relu"], "--mlp must be one of gelu, swiglu"),
    (["--norm", "batchnorm"], "--norm must be one of rmsnorm, layernorm"),
    (["--position", "alibi"], "--position must be one of rope, learned"),
    (["--device", "gpu"], "--device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
    (["--device", "cuda:x"], "--device must be one of .*got 'cuda:x'"),
    (["--device", "cpu:0"], "--device must be one of .*got 'cpu:0'"),
    # relations between model fields (n_head 0 above used to divide by zero here)
    (["--n_embd", "30", "--n_head", "4"], r"n_embd \(30\) must be divisible by n_head \(4\)"),
    (["--n_embd", "12", "--n_head", "4"], "RoPE needs an even head size"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_every_bad_value_is_refused_at_parse_time(flags, message):
    with pytest.raises(UserError, match=message) as err:
        parse_overrides(flags)
    assert "\n" not in str(err.value)


def test_defaults_and_every_preset_are_valid():
    Config().validate()
    for preset in PRESETS:
        parse_overrides(["--preset", preset]).validate()


def test_edge_values_that_mean_something_are_accepted():
    """The limits themselves, and the zeros that switch something off. (A guard against rules too
    strict: this passes before the rules existed, by design.)"""
    cfg = parse_overrides(["--grad_clip", "0", "--keep_checkpoints", "0", "--threads", "0", "--num_workers", "0",
                           "--intermediate_size", "0", "--n_segment", "0", "--weight_decay", "0", "--beta1", "0",
                           "--dropout", "0", "--min_lr", "0.002", "--lr", "0.002", "--warmup_steps", "600",
                           "--max_steps", "600", "--mask_prob", "1", "--mask_replace_prob", "0.9",
                           "--random_replace_prob", "0.1", "--span_min_words", "3", "--span_max_words", "3",
                           "--character_coverage", "1", "--seed", "0", "--device", "cuda:1", "--dtype", "fp16"])
    assert (cfg.train.grad_clip, cfg.train.device, cfg.train.warmup_steps) == (0.0, "cuda:1", 600)
    # --max_steps 0 prepares the tokenizer and data only: no warmup to fit in
    assert parse_overrides(["--max_steps", "0"]).train.warmup_steps == 100


def test_a_resumed_command_line_is_checked_field_by_field_until_the_checkpoint_is_read():
    """train.py parses the flags once without the checkpoint, then again on top of its config.
    The first parse cannot hold --max_steps 50 against the default warmup of 100: the checkpoint
    may have a shorter one. A value bad on its own is refused at once all the same."""
    assert parse_overrides(["--resume", "--max_steps", "50"]).train.max_steps == 50
    with pytest.raises(UserError, match="--lr must be a finite number > 0, got nan"):
        parse_overrides(["--resume", "--lr", "nan"])
    # on top of the checkpoint's config (the second parse) every rule applies
    saved = Config.from_dict(parse_overrides(["--warmup_steps", "10"]).to_dict())
    assert parse_overrides(["--resume", "--max_steps", "50"], base=saved).train.max_steps == 50
    with pytest.raises(UserError, match=r"--warmup_steps must be at most --max_steps \(5\)"):
        parse_overrides(["--resume", "--max_steps", "5"], base=saved)


def test_field_types_are_checked_and_flags_convert_to_the_declared_type():
    # a checkpoint's config written by hand, or by an older minilm, with a value of the wrong type
    with pytest.raises(UserError, match=r"^--lr expects a number, got 'fast'$"):
        Config.from_dict({"train": {"lr": "fast"}}).validate()
    with pytest.raises(UserError, match=r"^--compile expects true or false, got 1$"):
        Config.from_dict({"train": {"compile": 1}}).validate()
    with pytest.raises(UserError, match=r"^--n_layer expects an integer, got 2.5$"):
        ModelConfig(n_layer=2.5).validate()
    # a base config holding an int in a float field (Config built in Python) still takes --lr 0.5
    base = Config()
    base.train.lr = 1
    assert parse_overrides(["--lr", "0.5", "--min_lr", "0"], base=base).train.lr == 0.5
    with pytest.raises(UserError, match=r"^--n_layer expects an integer, got '1.5'$"):
        parse_overrides(["--n_layer", "1.5"])


@pytest.mark.parametrize("flags", [["--batch_size", "0"], ["--schedule", "bogus"], ["--lr", "nan"]])
def test_train_py_refuses_a_bad_flag_before_any_work(flags, tmp_path):
    """The command line run in-process (fast); test_cli.py and test_faults.py keep a real
    process for train.py's one-line errors."""
    out = tmp_path / "out"
    assert_user_error(run_in_process("train.py", "--out_dir", out, *TINY, *flags), flags[0])
    assert not out.exists()  # no tokenizer, no data, no checkpoint


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--top_p", "nan"], r"--top_p must be a finite number in \(0, 1\], got nan"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 0, got -1"),
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--seed", "-3"], r"--seed must be in \[0, 2\*\*64\), got -3"),
])
def test_sample_py_flags_are_checked_before_loading(flags, message, tmp_path):
    """In-process (fast): the checks run before the checkpoint is even looked for."""
    with pytest.raises(UserError, match=message):
        load_script("sample.py").main([*flags, "--ckpt", str(tmp_path / "none.pt")])


def test_sample_py_temperature_nan_end_to_end(tmp_path):
    assert_user_error(run("sample.py", "--temperature", "nan", "--ckpt", tmp_path), "--temperature", "nan")


# ----------------------------------------------------------------------------- checkpoint messages
def test_a_missing_checkpoint_names_the_callers_flag(tmp_path):
    missing = str(tmp_path / "none.pt")
    with pytest.raises(UserError, match="--ckpt"):
        load_checkpoint(missing)  # sample.py's flag is the default
    with pytest.raises(UserError, match=r"^no checkpoint at .*none.pt; pass an existing checkpoint file to "
                                        r"--resume, or train one first with train\.py$") as err:
        load_checkpoint(missing, resumable=True, flag="--resume")
    assert "--ckpt" not in str(err.value)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_refused_pickle_is_explained_without_advice_to_unpickle_it(tmp_path):
    """torch's message goes on to advise weights_only=False or allowlisting the global: either
    would run the file's code. The one line keeps torch's reason and says why minilm refused."""
    marker = tmp_path / "pwned"
    torch.save({"config": {}, "model": Payload(str(marker))}, tmp_path / "evil.pt")
    with open(tmp_path / "evil-pickle.pt", "wb") as f:
        pickle.dump({"config": {}, "model": Payload(str(marker))}, f)
    for name in ("evil.pt", "evil-pickle.pt"):
        with pytest.raises(UserError, match="refused to unpickle") as err:
            load_checkpoint(str(tmp_path / name))
        message = str(err.value)
        assert "\n" not in message and "can run code" in message, message
        for advice in ("weights_only", "safe_globals", "trust"):
            assert advice not in message, message
    assert "GLOBAL io.open" in str(err.value) or "Unsupported" in str(err.value)
    assert not marker.exists()


def test_a_refusal_in_another_torch_wording_never_passes_on_its_advice(tmp_path, monkeypatch):
    """Older and newer torch word the refusal differently; whatever the wording, the advice to
    load with weights_only=False never reaches the user, and the reason is not cut mid-word."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"x")
    wordings = [
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
        "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a "
        "trusted source.",
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
        "succeed, but it can result in arbitrary code execution.WeightsUnpickler error: Unsupported operand 149",
    ]
    for wording in wordings:
        def refuse(*args, wording=wording, **kwargs):
            raise pickle.UnpicklingError(wording)
        monkeypatch.setattr(torch, "load", refuse)
        with pytest.raises(UserError, match="refused to unpickle") as err:
            load_checkpoint(str(path))
        assert "weights_only" not in str(err.value) and "False" not in str(err.value), str(err.value)
    assert "(Unsupported operand 149)" in str(err.value)


# ----------------------------------------------------------------------------- --help
def test_help_gives_every_field_its_meaning_and_default():
    text = help_text()
    assert all(len(line) <= 100 for line in text.splitlines())
    for fields in (Config().model, Config().data, Config().obj, Config().train):
        for name in fields.__dataclass_fields__:
            assert f"  --{name} " in text or text.count(f"  --{name}\n"), name
    # a few meanings from README.md's tables, beside their flag and default
    lines = text.splitlines()
    assert any(ln.startswith("  --batch_size 16 ") and ln.endswith("sequences per micro-batch") for ln in lines)
    assert any(ln.startswith("  --grad_clip 1.0 ") and "max gradient norm; 0 disables" in ln for ln in lines)
    assert any(ln.startswith("  --data \"\" ") and "empty = the built-in corpus" in ln for ln in lines)
    assert "  --compile false " in text and "AdamW beta1" in text
    # sections in order, each titled
    titles = [text.index(t) for t in ("model (ModelConfig)", "data and tokenizer (DataConfig)",
                                      "objective options (ObjectiveConfig)", "training (TrainConfig)")]
    assert titles == sorted(titles)


def test_train_py_help_prints_the_meanings_and_exits_0():
    result = run("train.py", "--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "tokenizer size; the tokenizer is trained to exactly this many ids" in result.stdout
    assert "non-finite loss: stop with a message, or rollback" in result.stdout
    assert "objectives: clm, mlm" in result.stdout


# ----------------------------------------------------------------------------- --init_from's objective
def parent_of(objective: str, **obj) -> dict:
    """What config_for_init reads of an --init_from parent: its config and objective."""
    from minilm.objectives import model_config_for
    cfg = Config(model=model_config_for(objective, ModelConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=512)))
    cfg.train.objective = objective
    for name, value in obj.items():
        setattr(cfg.obj, name, value)
    return {"config": cfg.to_dict(), "objective": objective}


def test_init_from_inherits_the_parents_objective_unless_one_is_given():
    config_for_init = load_script("train.py").config_for_init
    said = []
    cfg = config_for_init(["--max_steps", "200"], parent_of("mlm"), "parent.pt", said.append)
    assert cfg.train.objective == "mlm" and cfg.model.embed_norm
    assert said == ["--init_from: training mlm, the objective of parent.pt (pass --objective to train another)"]
    cfg = config_for_init([], parent_of("mlm+sop", objective_weights="1,0.5"), "parent.pt", said.append)
    assert (cfg.train.objective, cfg.obj.objective_weights) == ("mlm+sop", "1,0.5")
    cfg = config_for_init(["--objective_weights", "2,1"], parent_of("mlm+sop", objective_weights="1,0.5"), "p.pt")
    assert cfg.obj.objective_weights == "2,1"
    said.clear()   # a given --objective wins, and nothing is said
    assert config_for_init(["--objective=wwm"], parent_of("mlm"), "parent.pt", said.append).train.objective == "wwm"
    assert said == []
    # a classifier is never inherited: its child says what it trains
    with pytest.raises(UserError, match=r"is a classifier: pass --objective classify") as err:
        config_for_init([], parent_of("classify", labels='["a", "b"]'), "parent.pt", said.append)
    assert "\n" not in str(err.value)
    cfg = config_for_init(["--objective", "classify"], parent_of("classify", labels='["a", "b"]'), "parent.pt")
    assert cfg.train.objective == "classify"


def test_init_from_an_mlm_run_without_objective_trains_mlm_end_to_end(tmp_path, corpus_dir):
    parent, child = tmp_path / "parent", tmp_path / "child"
    flags = ["--data", corpus_dir, "--max_steps", 1, *TINY]
    assert run_in_process("train.py", "--objective", "mlm", "--out_dir", parent, *flags).returncode == 0
    result = run_in_process("train.py", "--init_from", parent, "--out_dir", child, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    state = load_checkpoint(str(child / "ckpt-00000001.pt"))
    assert state["objective"] == "mlm" and state["config"]["train"]["objective"] == "mlm"   # not clm
    assert "--init_from: training mlm, the objective of" in result.stdout
