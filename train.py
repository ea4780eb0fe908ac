"""Train a model: `python train.py [--data PATH] [--preset small] [--objective clm] [--field value ...]`.

Under torchrun (`torchrun --nproc_per_node N train.py ...`) every process runs this file; rank 0
prepares the data and writes logs and checkpoints (see minilm/distributed.py).

1. resolve the config (preset, then flags; on --resume the checkpoint's config, then flags)
2. train a sentencepiece tokenizer on the data, unless out_dir already has one for the same data
   and preparation flags (see minilm/provenance.py, tokenizer_and_data)
3. tokenize the data into out_dir/data/{train,val}.bin, unless already there
4. build the objective (model + heads) and run the Trainer

What may be reused or continued (--resume, --init_from, prepared data) is checked in
minilm/provenance.py, what a run folder may hold in minilm/run_dir.py; this file is the path.
Every field of minilm/config.py is a flag. See README.md for the list.
"""
from __future__ import annotations

import os
from dataclasses import fields

import torch

from minilm.cli import run_cli
from minilm.config import PRESETS, Config, explicit_flags, help_text, parse_overrides, setting_origins
from minilm.data import make_source, mix_seed
from minilm.distributed import DistInfo, on_main, setup, teardown
from minilm.epochs import read_in_passes
from minilm.errors import UserError
from minilm.objectives import (OBJECTIVES, build_objective, model_config_for, model_defaults_for, objective_class,
                               train_defaults_for, window_length_for)
from minilm.provenance import (MODEL_FIELDS_FREE, Start, claim_out_dir, data_for_resume, given_tokenizer_of,
                               load_parent_weights, resolve_start, run_provenance, tokenizer_and_data)
# what tests (and scripts) have called as train.py's: they live in minilm/provenance.py
from minilm.provenance import config_for_init, config_for_resume, data_signature, prepare_settings  # noqa: F401
from minilm.run_dir import DATA_NAME, TOKENIZER_NAME, clear_earlier_run, keep_metrics_up_to
from minilm.tokenizer import Tokenizer
from minilm.trainer import Trainer, run_info, warn_if_parent_learned_nothing


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        print("\nFlags, with their defaults (--name value or --name=value; a bool flag alone means true):")
        print(help_text())
        print(f"\nobjectives: {', '.join(OBJECTIVES)}, or several joined by + (a+b trains both on one backbone: "
              f"minilm/objectives/multitask.py); presets: {', '.join(PRESETS)}")
        return
    cfg = parse_overrides(argv)
    dist_info, device_name = setup(cfg.train.device)
    cfg.train.device = device_name
    log = (lambda msg: print(msg, flush=True)) if dist_info.is_main else (lambda msg: None)
    try:
        train(cfg, argv, dist_info, log)
    finally:
        teardown()


def objective_classes(name: str) -> list:
    """The registered classes of objective `name` ("mlm", or the parts of "mlm+sop")."""
    return [objective_class(part) for part in name.split("+")]


def train(cfg: Config, argv: list[str], dist_info: DistInfo, log) -> None:
    # 1. the config: this command line's flags, on a resumed checkpoint's config or on an
    #    --init_from parent's model (minilm/provenance.py checks what may change)
    cfg, start = resolve_start(cfg, argv, dist_info, log)
    given, tokenizer = explicit_flags(argv), None
    if start.state is None:   # a fresh run
        tokenizer = given_tokenizer_of(cfg, argv, start.parent)   # --tokenizer: it fixes vocab_size
        for cls in objective_classes(cfg.train.objective):   # the objective's own choices (its `auto` options)
            cfg = cls.finish_config(cfg, start.parent_config, given)
        # the objective's defaults (a dropout, a learning rate) where the flags leave them out; an
        # --init_from parent's weights fix the model, so then only a free field (dropout) takes one
        fixed = set() if start.parent is None else {f.name for f in fields(cfg.model)} - MODEL_FIELDS_FREE
        cfg.model = model_defaults_for(cfg.train.objective, cfg.model, given | fixed)
        cfg.train = train_defaults_for(cfg.train.objective, cfg.train, given)
    # the objective's model settings are applied here, once: what is printed and saved is the model
    cfg.model = model_config_for(cfg.train.objective, cfg.model, cfg.obj)
    log(setting_origins(argv, cfg))   # each value that is not minilm's default: from the flags, --config's file...
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg.model.validate()
    window_length_for(cfg.train.objective, cfg.model, cfg.obj)   # its options fit the model: before any data work
    if cfg.train.fsdp and cfg.train.compile:
        raise UserError("--fsdp and --compile together are not supported yet; drop one of them")
    # one run per folder: every input checked, then rank 0 holds the lock until this process ends
    lock = on_main(lambda: claim_out_dir(cfg, start), dist_info)
    try:
        prepare_and_train(cfg, dist_info, log, start, tokenizer, given)
    finally:
        if lock is not None:
            lock.release()


def prepare_and_train(cfg: Config, dist_info: DistInfo, log, start: Start, tokenizer: Tokenizer | None,
                      flags_given: set[str] = frozenset()) -> None:
    out = cfg.train.out_dir
    log(cfg.describe())
    log("run: " + "  ".join(f"{k}={v}" for k, v in run_info(dist_info.world_size).items()))

    # 2-3. the tokenizer and the token files: rank 0 reuses out_dir's or makes them (training the
    # tokenizer unless the run brings one: a checkpoint's, --tokenizer); the others wait, then load them
    given = start.tokenizer()
    given = tokenizer if given is None else given
    if start.state is not None:   # the tokens the checkpoint trained on, made by its tokenizer
        tokenizer = on_main(lambda: data_for_resume(cfg, given, start.state, start.path, log), dist_info)
    else:
        tokenizer = on_main(lambda: tokenizer_and_data(cfg, log, tokenizer=given), dist_info)
    if tokenizer is None:
        tokenizer = given if given is not None else Tokenizer.load(os.path.join(out, TOKENIZER_NAME))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model expects vocab_size "
                        f"{cfg.model.vocab_size}; use a fresh --out_dir")
    if cfg.train.max_steps == 0:
        if start.state is None:
            on_main(lambda: clear_earlier_run(out, cfg.train.overwrite, log), dist_info)
        log(f"--max_steps 0: the tokenizer and token files are ready in {out}; nothing to train")
        return
    data_dir = os.path.join(out, DATA_NAME)
    for cls in objective_classes(cfg.train.objective):   # what it learns from the data (a classifier: its labels)
        cfg = cls.read_data_facts(cfg, data_dir, log)

    # 4. the objective: the model and its heads, the same initial weights on every rank
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    if start.parent is not None:
        load_parent_weights(objective, start.parent, start.parent_path, log)
        warn_if_parent_learned_nothing(start.parent, start.parent_path, log)
    # the raw tokens a row takes: seq_len + 1, or more for t5 (its spans shrink into sentinels)
    window = window_length_for(cfg.train.objective, cfg.model, cfg.obj)
    train_source = make_source(objective.data, data_dir, "train", cfg.model.seq_len, cfg.train.batch_size,
                               seed=cfg.train.seed, log=log, window_length=window)
    # --epochs N: the training data in passes, and max_steps from its size
    train_source = read_in_passes(cfg, train_source, dist_info.world_size, flags_given, log)
    # validation windows do not depend on the training seed: runs with different seeds compare
    val_source = make_source(objective.data, data_dir, "val", cfg.model.seq_len, cfg.train.batch_size, seed=0,
                             log=log, window_length=window)
    torch.manual_seed(mix_seed(cfg.train.seed, dist_info.rank))  # dropout noise differs across ranks

    # 5. train: every checkpoint records the data's fingerprints and the --init_from parent
    trainer = Trainer(cfg, objective, train_source, val_source, tokenizer, log=log, dist_info=dist_info,
                      provenance=run_provenance(data_dir, start, dist_info.is_main))
    if start.state is not None:
        trainer.load(start.path, start.state)
        log(f"resumed from {start.path} at step {trainer.step}")
        if dist_info.is_main:
            dropped = keep_metrics_up_to(out, trainer.step)
            if dropped:
                log(f"metrics.jsonl: dropped {dropped} row(s) logged after step {trainer.step}, which this run redoes")
    else:   # only now, with the data ready and the model built: a run refused on the way lost nothing
        on_main(lambda: clear_earlier_run(out, cfg.train.overwrite, log), dist_info)
    trainer.fit()
    if trainer.stop_signal is not None:
        raise SystemExit(128 + int(trainer.stop_signal))
    report = objective.report(trainer.last_eval_sums)   # a classifier's confusion matrix
    if report:
        log(report)
    ev = trainer.last_eval
    if ev and "loss" in ev:
        log(f"done: val loss {ev['loss']:.4f}" + (f", bits per byte {ev['bpb']:.4f}" if "bpb" in ev else "")
            + (f", acc {ev['acc']:.4f}, macro-F1 {ev['macro_f1']:.4f} (best {trainer.best_value:.4f}: "
               f"{os.path.join(out, 'best.pt')})" if "macro_f1" in ev else "")
            + f"; checkpoints in {out}")


if __name__ == "__main__":
    run_cli(main)
