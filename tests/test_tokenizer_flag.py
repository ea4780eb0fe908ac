"""--tokenizer: a fresh run uses exactly the given tokenizer (the same ids as the run it came
from), which sets vocab_size; it is refused beside --init_from, with a contradicting --vocab_size,
or when the file cannot be read."""
from __future__ import annotations

import os

from minilm.checkpoint import load_checkpoint, tensor_to_bytes
from tests.conftest import run_in_process
from tests.test_cli import TINY, assert_user_error

SMALL = [flag for flag in TINY]
SMALL[SMALL.index("--vocab_size") + 1] = "600"


def test_a_run_uses_the_given_tokenizer_and_its_vocab_size(tmp_path, corpus_dir):
    first = tmp_path / "first"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", first, "--max_steps", 0, *SMALL)
    assert result.returncode == 0, result.stderr
    given = first / "tokenizer.model"
    second = tmp_path / "second"
    # no --vocab_size: the tokenizer's size (600) wins over the default
    args = [a for a in SMALL]
    at = args.index("--vocab_size")
    del args[at:at + 2]
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", second, "--tokenizer", given,
                            "--max_steps", 2, "--ckpt_every", 2, *args)
    assert result.returncode == 0, result.stderr
    assert (second / "tokenizer.model").read_bytes() == given.read_bytes()
    state = load_checkpoint(os.path.join(second, "ckpt-00000002.pt"))
    assert tensor_to_bytes(state["tokenizer"]) == given.read_bytes()
    assert state["config"]["model"]["vocab_size"] == 600
    assert "training a" not in result.stdout   # no tokenizer was trained


def test_tokenizer_flag_refusals(tmp_path, corpus_dir):
    first = tmp_path / "first"
    assert run_in_process("train.py", "--data", corpus_dir, "--out_dir", first, "--max_steps", 1,
                          "--ckpt_every", 1, *SMALL).returncode == 0
    given = first / "tokenizer.model"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "b", "--tokenizer", given,
                            "--init_from", first, "--max_steps", 1, *SMALL)
    assert_user_error(result, "--tokenizer and --init_from both give a tokenizer", "drop --tokenizer")
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "c", "--tokenizer", given,
                            "--max_steps", 1, *TINY)   # TINY says --vocab_size 512
    assert_user_error(result, "--vocab_size 512 does not match --tokenizer", "(600 ids)")
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "d", "--tokenizer",
                            tmp_path / "missing.model", "--max_steps", 1, *SMALL)
    assert_user_error(result, "cannot read tokenizer", "missing.model")


def test_a_tokenizer_minilm_did_not_make_is_refused_before_any_data_work(tmp_path, corpus_dir):
    """<pad> at 0 and <mask> at 4 are not enough: with no sentinels at 7.., ordinary words would
    be sentinel ids to t5 (tests/test_tokenizer.py has the rule)."""
    from tests.test_tokenizer import foreign_model
    given = tmp_path / "foreign.model"
    given.write_bytes(foreign_model(vocab_size=300, control_symbols=["<mask>"], byte_fallback=True))
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "out", "--tokenizer", given,
                            "--objective", "t5", "--max_steps", 1, *SMALL)
    assert_user_error(result, "not trained by minilm: id 5 is the piece", "not <cls>", "leave out --tokenizer")
    assert not (tmp_path / "out" / "data").exists()
