"""Train a model: `python train.py [--data PATH] [--preset small] [--objective clm] [--field value ...]`.

Under torchrun (`torchrun --nproc_per_node N train.py ...`) every process runs this file; rank 0
prepares the data and writes logs and checkpoints (see minilm/distributed.py).

1. resolve the config (preset, then flags; on --resume the checkpoint's config, then flags)
2. train a sentencepiece tokenizer on the data, unless out_dir already has one for the same data
   and preparation flags (see tokenizer_and_data)
3. tokenize the data into out_dir/data/{train,val}.bin, unless already there
4. build the objective (model + heads) and run the Trainer

Every field of minilm/config.py is a flag. See README.md for the list.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys

import torch

from minilm.checkpoint import load_checkpoint, newest_loadable, tensor_to_bytes
from minilm.cli import run_cli
from minilm.config import Config, explicit_flags, parse_overrides
from minilm.data import (BUILTIN, PROGRESS_EVERY, Stopped, display, file_format, inspect_prepared, make_source,
                         mix_seed, prepare, resolve_files, stop_on_sigterm, tokenizer_fingerprint, tokenizer_texts)
from minilm.distributed import DistInfo, barrier, setup, teardown
from minilm.errors import UserError
from minilm.objectives import OBJECTIVES, build_objective
from minilm.tokenizer import Tokenizer
from minilm.trainer import Trainer, check_writable, run_info

MODEL_FIELDS_FIXED_ON_RESUME = {"vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "intermediate_size",
                                "mlp", "norm", "position", "bias", "tie_embeddings", "n_segment", "preset"}


def data_signature(source: str, files: list[str]) -> str:
    """What the prepared data was made from: paths, sizes and modification times."""
    if source == BUILTIN:
        return BUILTIN + sys.version.split()[0]
    h = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        # os.fsencode: the path's own bytes, also for a file name that is not UTF-8
        h.update(os.fsencode(os.path.abspath(path)) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare_settings(cfg: Config, files: list[str]) -> dict:
    """The flags besides the files and vocab size that shape the tokenizer and the split; a change
    to any of them means preparing again. --text_field counts only when there is structured data
    (JSON Lines, JSON, CSV or TSV, compressed or not)."""
    settings = {"val_fraction": cfg.data.val_fraction, "character_coverage": cfg.data.character_coverage,
                "tokenizer_sample_lines": cfg.data.tokenizer_sample_lines}
    if any(file_format(f) != "text" for f in files):
        settings["text_field"] = cfg.data.text_field
    return settings


def why_prepare_again(meta: dict, signature: str, vocab_size: int, settings: dict, data_dir: str) -> str | None:
    """Why out_dir's prepared data cannot be reused for this run, or None when it can."""
    missing = [key for key in ("train_tokens", "val_tokens", "tokenizer") if key not in meta]
    if missing:
        return f"{data_dir}/meta.json lacks {missing[0]!r}"
    if meta.get("signature") != signature:
        return f"the data files changed since {data_dir} was prepared"
    if meta.get("vocab_size") != vocab_size:
        return f"--vocab_size changed ({meta.get('vocab_size')} -> {vocab_size})"
    old = meta.get("settings")
    if not isinstance(old, dict):
        return f"{data_dir} does not record the flags it was prepared with (an older minilm made it)"
    changed = [f"--{k} changed ({old.get(k, 'unset')} -> {v})" for k, v in settings.items() if old.get(k) != v]
    return ", ".join(changed) or None


def tokenizer_and_data(cfg: Config, log=print, progress_every: float = PROGRESS_EVERY) -> Tokenizer:
    """Reuse out_dir's tokenizer and token files when they were made from the same data, vocab
    size and preparation flags (prepare_settings) and are intact; otherwise train the tokenizer
    and prepare the data again, saying why. Files under out_dir are never read as data.

    Ctrl-C or SIGTERM while preparing: one line on stderr, nothing half-written left behind,
    and exit code 130 or 143 (128 + the signal)."""
    source = cfg.data.data or BUILTIN
    out = cfg.train.out_dir
    tok_path, data_dir = os.path.join(out, "tokenizer.model"), os.path.join(out, "data")
    files = [] if source == BUILTIN else resolve_files(source, exclude=out, log=log)
    signature = data_signature(source, files)
    settings = prepare_settings(cfg, files)
    meta, reason = inspect_prepared(data_dir)
    if meta is not None and os.path.exists(tok_path):
        reason = why_prepare_again(meta, signature, cfg.model.vocab_size, settings, data_dir)
        if reason is None:
            try:
                tokenizer = Tokenizer.load(tok_path)
            except UserError:
                tokenizer = None
            if tokenizer is not None and meta.get("tokenizer") == tokenizer_fingerprint(tokenizer):
                log(f"reusing {tok_path} and {data_dir} ({meta['train_tokens']:,} train tokens)")
                return tokenizer
            reason = f"{tok_path} is not the tokenizer that prepared {data_dir}"
    if reason is not None:
        log(f"preparing again: {reason}")
    corpus = "the built-in corpus (pydoc topics + stdlib docstrings)" if source == BUILTIN else display(source)
    log(f"training a {cfg.model.vocab_size}-piece BPE tokenizer on {corpus}")
    try:
        with stop_on_sigterm():
            texts = tokenizer_texts(source, cfg.data.text_field, files=files, log=log, progress_every=progress_every)
            tokenizer = Tokenizer.train(texts, cfg.model.vocab_size, character_coverage=cfg.data.character_coverage,
                                        sample_lines=cfg.data.tokenizer_sample_lines, seed=cfg.train.seed)
            # meta.json is written once, atomically, with what the data was made from
            prepare(source, tokenizer, data_dir, text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction,
                    num_workers=cfg.data.num_workers, log=log, files=files, progress_every=progress_every,
                    extra_meta={"signature": signature, "settings": settings})
            try:
                tokenizer.save(tok_path)  # last: a stop before here leaves no new tokenizer beside old data
            except OSError as err:
                raise UserError(f"cannot write {tok_path}: {err.strerror or err}") from None
    except (KeyboardInterrupt, Stopped) as stop:
        signum = int(stop.signum if isinstance(stop, Stopped) else signal.SIGINT)
        print(f"stopped by signal {signum} while preparing data; nothing was saved", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    return tokenizer


def wants_resume(value: str) -> str | None:
    """--resume value -> None (fresh start), "auto" or a checkpoint path."""
    low = value.strip().lower()
    if low in ("", "false", "0", "no", "off"):
        return None
    if low in ("auto", "true", "1", "yes", "on"):
        return "auto"
    return value


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        print("\nflags (with defaults):\n" + Config().describe())
        print(f"presets: tiny, small, base; objectives: {', '.join(OBJECTIVES)}")
        return
    cfg = parse_overrides(argv)
    dist_info, device_name = setup(cfg.train.device)
    cfg.train.device = device_name
    log = (lambda msg: print(msg, flush=True)) if dist_info.is_main else (lambda msg: None)
    try:
        train(cfg, argv, dist_info, log)
    finally:
        teardown()


def train(cfg: Config, argv: list[str], dist_info: DistInfo, log) -> None:
    state, ckpt_path = None, None
    resume = wants_resume(cfg.train.resume)
    if resume is not None:
        if resume == "auto":
            ckpt_path, state = newest_loadable(cfg.train.out_dir, log=log)
        else:
            ckpt_path, state = resume, load_checkpoint(resume, resumable=True)
        if state.get("tokenizer") is None:
            raise UserError(f"{ckpt_path} carries no tokenizer, so train.py cannot resume from it; start a new run")
        fixed = explicit_flags(argv) & MODEL_FIELDS_FIXED_ON_RESUME
        if fixed:
            raise UserError(f"--{sorted(fixed)[0]} cannot change when resuming; the model's shape comes "
                            f"from {ckpt_path}")
        # the checkpoint's config, with this command line's flags on top (e.g. a larger --max_steps)
        cfg = parse_overrides(argv, base=Config.from_dict(state["config"]))
        cfg.train.device = setup_device_name(cfg.train.device, dist_info)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg.model.validate()
    if cfg.train.fsdp and cfg.train.compile:
        raise UserError("--fsdp and --compile together are not supported yet; drop one of them")
    if dist_info.is_main:
        check_writable(cfg.train.out_dir)
    info = run_info(dist_info.world_size)
    log(cfg.describe())
    log("run: " + "  ".join(f"{k}={v}" for k, v in info.items()))

    if state is not None:
        tokenizer = Tokenizer(tensor_to_bytes(state["tokenizer"]))
    else:
        # rank 0 trains the tokenizer and tokenizes the data; the others wait, then reuse it
        if dist_info.is_main:
            tokenizer = tokenizer_and_data(cfg, log)
        barrier(dist_info)
        if not dist_info.is_main:
            tokenizer = Tokenizer.load(os.path.join(cfg.train.out_dir, "tokenizer.model"))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model expects vocab_size "
                        f"{cfg.model.vocab_size}; use a fresh --out_dir")
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    data_dir = os.path.join(cfg.train.out_dir, "data")
    train_source = make_source(objective.data, data_dir, "train", cfg.model.seq_len, cfg.train.batch_size,
                               seed=cfg.train.seed, log=log)
    # validation windows do not depend on the training seed: runs with different seeds compare
    val_source = make_source(objective.data, data_dir, "val", cfg.model.seq_len, cfg.train.batch_size, seed=0,
                             log=log)
    torch.manual_seed(mix_seed(cfg.train.seed, dist_info.rank))  # dropout noise differs across ranks
    trainer = Trainer(cfg, objective, train_source, val_source, tokenizer, log=log, dist_info=dist_info)
    if state is not None:
        trainer.load(ckpt_path, state)
        log(f"resumed from {ckpt_path} at step {trainer.step}")
    trainer.fit()
    if trainer.stop_signal is not None:
        raise SystemExit(128 + int(trainer.stop_signal))
    ev = trainer.last_eval
    if ev and "loss" in ev:
        log(f"done: val loss {ev['loss']:.4f}" + (f", bits per byte {ev['bpb']:.4f}" if "bpb" in ev else "")
            + f"; checkpoints in {cfg.train.out_dir}")


def setup_device_name(name: str, dist_info: DistInfo) -> str:
    """Under torchrun each process owns one GPU, whatever the checkpoint's config said."""
    if dist_info.enabled and torch.cuda.is_available() and not name.startswith("cpu"):
        return f"cuda:{dist_info.local_rank}"
    return name


if __name__ == "__main__":
    run_cli(main)
