"""Train a model: `python train.py [--data PATH] [--preset small] [--objective clm] [--field value ...]`.

1. resolve the config (preset, then flags; on --resume the checkpoint's config, then flags)
2. train a sentencepiece tokenizer on the data, unless out_dir already has one for the same data
3. tokenize the data into out_dir/data/{train,val}.bin, unless already there
4. build the objective (model + heads) and run the Trainer

Every field of minilm/config.py is a flag. See README.md for the list.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from minilm.checkpoint import load_checkpoint, tensor_to_bytes
from minilm.cli import run_cli
from minilm.config import Config, explicit_flags, parse_overrides
from minilm.data import (BUILTIN, iter_texts, load_meta, make_source, prepare, resolve_files,
                         tokenizer_fingerprint)
from minilm.errors import UserError
from minilm.objectives import OBJECTIVES, build_objective
from minilm.tokenizer import Tokenizer
from minilm.trainer import Trainer, check_writable

MODEL_FIELDS_FIXED_ON_RESUME = {"vocab_size", "seq_len", "n_layer", "n_head", "n_embd", "intermediate_size",
                                "mlp", "norm", "position", "bias", "tie_embeddings", "preset"}


def data_signature(source: str) -> str:
    """What the prepared data was made from: paths, sizes and modification times."""
    if source == BUILTIN:
        return BUILTIN + sys.version.split()[0]
    h = hashlib.sha256()
    for path in resolve_files(source):
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenizer_and_data(cfg: Config, log=print) -> Tokenizer:
    """Reuse out_dir's tokenizer and token files when they were made from the same data and
    vocab size; otherwise train the tokenizer and prepare the data again."""
    source = cfg.data.data or BUILTIN
    out = cfg.train.out_dir
    tok_path, data_dir = os.path.join(out, "tokenizer.model"), os.path.join(out, "data")
    signature = data_signature(source)
    meta = load_meta(data_dir)
    if (meta is not None and os.path.exists(tok_path) and meta.get("signature") == signature
            and meta.get("vocab_size") == cfg.model.vocab_size):
        tokenizer = Tokenizer.load(tok_path)
        if meta.get("tokenizer") == tokenizer_fingerprint(tokenizer):
            log(f"reusing {tok_path} and {data_dir} ({meta['train_tokens']:,} train tokens)")
            return tokenizer
    log(f"training a {cfg.model.vocab_size}-piece BPE tokenizer on "
        f"{'the built-in corpus (pydoc topics + stdlib docstrings)' if source == BUILTIN else source}")
    tokenizer = Tokenizer.train(iter_texts(source, cfg.data.text_field), cfg.model.vocab_size,
                                character_coverage=cfg.data.character_coverage,
                                sample_lines=cfg.data.tokenizer_sample_lines, seed=cfg.train.seed)
    tokenizer.save(tok_path)
    meta = prepare(source, tokenizer, data_dir, text_field=cfg.data.text_field,
                   val_fraction=cfg.data.val_fraction, num_workers=cfg.data.num_workers, log=log)
    meta["signature"] = signature
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return tokenizer


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        print("\nflags (with defaults):\n" + Config().describe())
        print(f"presets: tiny, small, base; objectives: {', '.join(OBJECTIVES)}")
        return
    cfg = parse_overrides(argv)
    state = None
    if cfg.train.resume:
        ckpt_path = os.path.join(cfg.train.out_dir, "ckpt.pt")
        state = load_checkpoint(ckpt_path)
        fixed = explicit_flags(argv) & MODEL_FIELDS_FIXED_ON_RESUME
        if fixed:
            raise UserError(f"--{sorted(fixed)[0]} cannot change when resuming; the model's shape comes "
                            f"from {ckpt_path}")
        # the checkpoint's config, with this command line's flags on top (e.g. a larger --max_steps)
        cfg = parse_overrides(argv, base=Config.from_dict(state["config"]))
        cfg.train.resume = True
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg.model.validate()
    check_writable(cfg.train.out_dir)
    print(cfg.describe(), flush=True)

    if state is not None:
        tokenizer = Tokenizer(tensor_to_bytes(state["tokenizer"]))
    else:
        tokenizer = tokenizer_and_data(cfg)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model expects vocab_size "
                        f"{cfg.model.vocab_size}; use a fresh --out_dir")
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    data_dir = os.path.join(cfg.train.out_dir, "data")
    train = make_source(objective.data, data_dir, "train", cfg.model.seq_len, cfg.train.batch_size,
                        seed=cfg.train.seed)
    # validation windows do not depend on the training seed: runs with different seeds compare
    val = make_source(objective.data, data_dir, "val", cfg.model.seq_len, cfg.train.batch_size, seed=0)
    trainer = Trainer(cfg, objective, train, val, tokenizer, log=lambda msg: print(msg, flush=True))
    if state is not None:
        trainer.load(os.path.join(cfg.train.out_dir, "ckpt.pt"), state)
        print(f"resumed from step {trainer.step}", flush=True)
    trainer.fit()
    ev = trainer.last_eval
    if ev:
        print(f"done: val loss {ev.get('loss', float('nan')):.4f}, bits per byte {ev.get('bpb', float('nan')):.4f}; "
              f"checkpoint in {os.path.join(cfg.train.out_dir, 'ckpt.pt')}")


if __name__ == "__main__":
    run_cli(main)
