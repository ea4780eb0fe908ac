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

import copy
import dataclasses
import hashlib
import json
import os
import signal
import sys

import torch

from minilm.checkpoint import load_checkpoint, load_checkpoint_or_newest, newest_loadable, tensor_to_bytes
from minilm.cli import run_cli
from minilm.config import FRESH_START, PRESETS, Config, explicit_flags, help_text, parse_overrides
from minilm.data import (BUILTIN, PROGRESS_EVERY, Stopped, display, file_format, inspect_prepared, make_source,
                         iter_rows, mix_seed, prepare, prepare_rows, resolve_files, row_texts, source_class, stop_on_sigterm,
                         iter_texts, tokenizer_fingerprint, tokenizer_texts)
from minilm.distributed import DistInfo, on_main, setup, teardown
from minilm.errors import UserError
from minilm.objectives import (OBJECTIVES, build_objective, data_kind_for, is_encoder_decoder, model_config_for,
                               window_length_for)
from minilm.objectives import model_defaults_for, train_defaults_for  # simcse (model), any objective (train)
from minilm.run_dir import (DATA_NAME, TOKENIZER_NAME, RunLock, check_data_outside, check_run_dir,
                            clear_previous_run, keep_metrics_up_to, mark_run_dir)
from minilm.tokenizer import Tokenizer
from minilm.trainer import Trainer, check_writable, run_info, warn_if_parent_learned_nothing


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


def row_spec(cfg: Config):
    """How the objective's source wants the data prepared: None for running text (documents),
    else (columns, optional columns, label column) of a table's rows (minilm/data/rows.py)."""
    cls = source_class(data_kind_for(cfg.train.objective))
    if cls.prepares != "rows":
        if cfg.data.val_data:
            raise UserError(f"--val_data names a file of validation rows, for objectives that read rows of a "
                            f"table; {cfg.train.objective} reads running text, split by --val_fraction")
        return None
    return cls.row_columns(cfg.data)


def prepare_settings(cfg: Config, files: list[str]) -> dict:
    """The flags besides the files and vocab size that shape the tokenizer and the split; a change
    to any of them means preparing again. --text_field counts only when there is structured data
    (JSON Lines, JSON, CSV or TSV, compressed or not); row data records its columns."""
    settings = {"val_fraction": cfg.data.val_fraction, "character_coverage": cfg.data.character_coverage,
                "tokenizer_sample_lines": cfg.data.tokenizer_sample_lines}
    if any(file_format(f) != "text" for f in files):
        settings["text_field"] = cfg.data.text_field
    spec = row_spec(cfg)
    if spec is not None:
        columns, optional, label_column = spec
        settings["rows"] = {"columns": [name for name, _ in columns], "optional": sorted(optional),
                            "label": label_column, "val_data": cfg.data.val_data}
    return settings


def source_files(cfg: Config, log=None) -> list[str]:
    """The files of --data, then those of --val_data: what the prepared data is made from."""
    out = cfg.train.out_dir
    files = [] if not cfg.data.data else resolve_files(cfg.data.data, exclude=out, log=log)
    if cfg.data.val_data:
        files = files + resolve_files(cfg.data.val_data, exclude=out, log=log)
    return files


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


def tokenizer_and_data(cfg: Config, log=print, tokenizer: Tokenizer | None = None,
                       progress_every: float = PROGRESS_EVERY) -> Tokenizer:
    """Reuse out_dir's tokenizer and token files when they were made from the same data, vocab
    size and preparation flags (prepare_settings) and are intact; otherwise train the tokenizer
    and prepare the data again, saying why. Files under out_dir are never read as data. A given
    `tokenizer` (an --init_from parent's, a resumed checkpoint's) is never retrained: the data is
    prepared with it unless out_dir's was made by it.

    Ctrl-C or SIGTERM while preparing: one line on stderr, nothing half-written left behind,
    and exit code 130 or 143 (128 + the signal)."""
    source = cfg.data.data or BUILTIN
    out = cfg.train.out_dir
    tok_path, data_dir = os.path.join(out, TOKENIZER_NAME), os.path.join(out, DATA_NAME)
    files = source_files(cfg, log)
    spec = row_spec(cfg)
    signature = data_signature(source, files)
    settings = prepare_settings(cfg, files)
    meta, reason = inspect_prepared(data_dir)
    if meta is not None and os.path.exists(tok_path):
        reason = why_prepare_again(meta, signature, cfg.model.vocab_size, settings, data_dir)
        if reason is None:
            try:
                existing = tokenizer if tokenizer is not None else Tokenizer.load(tok_path)
            except UserError as err:   # a damaged tokenizer.model: made again with the data
                existing, damaged = None, str(err)
            if existing is None:
                reason = f"{tok_path} is damaged ({damaged})"
            elif meta.get("tokenizer") == tokenizer_fingerprint(existing):
                if not typed_specials_may_be_ids(meta, existing):
                    log(f"reusing {tok_path} and {data_dir} ({meta['train_tokens']:,} train tokens)"
                        + ("; --overwrite keeps prepared data made from the same files and flags"
                           if cfg.train.overwrite else ""))
                    return existing
                tokenizer = existing   # the same tokenizer, the same ids: only the tokens are redone
                reason = TYPED_SPECIALS_REASON.format(data_dir=data_dir)
            else:
                reason = (f"{data_dir} was not made by the given tokenizer" if tokenizer is not None else
                          f"{tok_path} is not the tokenizer that prepared {data_dir}")
    if reason is not None:
        log(f"preparing again: {reason}")
    try:
        with stop_on_sigterm():
            if tokenizer is None:
                log(f"training a {cfg.model.vocab_size}-piece BPE tokenizer on "
                    f"{'the built-in corpus (pydoc topics + stdlib docstrings)' if source == BUILTIN else display(source)}")
                if spec is None:
                    texts = tokenizer_texts(source, cfg.data.text_field, files=files, log=log,
                                            progress_every=progress_every)
                else:   # the text cells of the training rows (not --val_data's)
                    train_files = resolve_files(source, exclude=out) if source != BUILTIN else []
                    texts = row_texts(source, spec[0], optional=spec[1], files=train_files, log=log,
                                      progress_every=progress_every)
                tokenizer = Tokenizer.train(texts, cfg.model.vocab_size, character_coverage=cfg.data.character_coverage,
                                            sample_lines=cfg.data.tokenizer_sample_lines, seed=cfg.train.seed)
            # meta.json is written once, atomically, with what the data was made from
            extra_meta = {"signature": signature, "settings": settings, "typed_specials_escaped": True}
            if spec is None:
                prepare(source, tokenizer, data_dir, text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction,
                        num_workers=cfg.data.num_workers, log=log, files=files, progress_every=progress_every,
                        extra_meta=extra_meta)
            else:
                columns, optional, label_column = spec
                prepare_rows(source, tokenizer, data_dir, columns=columns, optional=optional,
                             label_column=label_column, val_source=cfg.data.val_data or None,
                             val_fraction=cfg.data.val_fraction, num_workers=cfg.data.num_workers, log=log,
                             files=resolve_files(source, exclude=out) if source != BUILTIN else None,
                             progress_every=progress_every, extra_meta=extra_meta)
            try:
                tokenizer.save(tok_path)  # last: a stop before here leaves no new tokenizer beside old data
            except OSError as err:
                raise UserError(f"cannot write {tok_path}: {err.strerror or err}") from None
    except (KeyboardInterrupt, Stopped) as stop:
        signum = int(stop.signum if isinstance(stop, Stopped) else signal.SIGINT)
        print(f"stopped by signal {signum} while preparing data; nothing was saved", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    return tokenizer


TYPED_SPECIALS_REASON = ("{data_dir} was tokenized before typed special tokens were kept out of the special ids "
                         "(text saying <mask> or <sep> became those ids); tokenizing it again with the same tokenizer")


def typed_specials_may_be_ids(meta: dict, tokenizer: Tokenizer) -> bool:
    """True for token files an older minilm made with a tokenizer whose reserved pieces text can
    spell (user-defined symbols, before they became control symbols): such files may hold mask or
    separator ids where the text only said "<mask>". The tokenizer itself stays (a checkpoint's
    ids depend on it): it escapes such text now, so tokenizing again makes the files clean."""
    return tokenizer.escapes_reserved_text and not meta.get("typed_specials_escaped")


def wants_resume(value: str) -> str | None:
    """--resume value -> None (fresh start), "auto" or a checkpoint path."""
    low = value.strip().lower()
    if low in FRESH_START:
        return None
    if low in ("auto", "true", "1", "yes", "on"):
        return "auto"
    return value


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        print("\nFlags, with their defaults (--name value or --name=value; a bool flag alone means true):")
        print(help_text())
        print(f"\nobjectives: {', '.join(OBJECTIVES)}, or several joined by + (e.g. mlm+sop); "
              f"presets: {', '.join(PRESETS)}")
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
    state, ckpt_path, parent, parent_path = None, None, None, None
    resume = wants_resume(cfg.train.resume)
    if resume is not None and cfg.train.init_from:
        raise UserError("--resume continues a run, --init_from starts a new one from a checkpoint's weights; "
                        "pass one of them")
    if resume is not None:
        if resume == "auto":
            ckpt_path, state = newest_loadable(cfg.train.out_dir, log=log)
        else:
            ckpt_path, state = resume, load_checkpoint(resume, resumable=True, flag="--resume")
        if state.get("tokenizer") is None:
            raise UserError(f"{ckpt_path} carries no tokenizer, so train.py cannot resume from it; start a new run")
        cfg = config_for_resume(argv, state, ckpt_path)
        cfg.train.device = setup_device_name(cfg.train.device, dist_info)
    elif cfg.train.init_from:
        parent_path, parent = load_checkpoint_or_newest(cfg.train.init_from, log=log, flag="--init_from")
        if parent.get("tokenizer") is None:
            raise UserError(f"{parent_path} carries no tokenizer, so --init_from cannot reuse it; pass a "
                            "checkpoint written by train.py")
        cfg = config_for_init(argv, parent, parent_path, log)
    given_tokenizer = given_tokenizer_of(cfg, argv, parent) if state is None else None
    if cfg.train.objective == "classify" and state is None:   # classify: its `auto` options made concrete
        cfg.obj = classifier_options(cfg.obj, parent)
        if parent is None:   # from scratch: the model a fine-tuned encoder would be (classify.py)
            from minilm.objectives.classify import scratch_model_config
            cfg.model = scratch_model_config(cfg.model, explicit_flags(argv))
    # simcse: an objective's model defaults (its dropout 0.1) where a fresh run's flags leave them out
    if resume is None:
        cfg.model = model_defaults_for(cfg.train.objective, cfg.model, explicit_flags(argv))
        cfg.train = train_defaults_for(cfg.train.objective, cfg.train, explicit_flags(argv))
    # the objective's model settings are applied here, once: what is printed and saved is the model
    cfg.model = model_config_for(cfg.train.objective, cfg.model)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg.model.validate()
    window_length_for(cfg.train.objective, cfg.model, cfg.obj)   # its options fit the model: before any data work
    if cfg.train.fsdp and cfg.train.compile:
        raise UserError("--fsdp and --compile together are not supported yet; drop one of them")
    # one run per folder: rank 0 holds the lock until this process ends
    lock = on_main(lambda: claim_out_dir(cfg, resumed=state is not None, parent_path=parent_path, log=log),
                   dist_info)
    try:
        prepare_and_train(cfg, dist_info, log, state, ckpt_path, parent, parent_path, given_tokenizer)
    finally:
        if lock is not None:
            lock.release()


def given_tokenizer_of(cfg: Config, argv: list[str], parent) -> Tokenizer | None:
    """The tokenizer --tokenizer names, for a fresh run (a resumed one has its checkpoint's); it
    fixes vocab_size. Two runs that should differ only in their weights (pretrained vs from
    scratch) then see the same ids. An --init_from parent brings its own tokenizer: both is an error."""
    if not cfg.data.tokenizer:
        return None
    if parent is not None:
        raise UserError("--tokenizer and --init_from both give a tokenizer; the checkpoint's is the one its "
                        "weights were trained with: drop --tokenizer")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    if "vocab_size" in explicit_flags(argv) and cfg.model.vocab_size != tokenizer.vocab_size:
        raise UserError(f"--vocab_size {cfg.model.vocab_size} does not match --tokenizer {cfg.data.tokenizer} "
                        f"({tokenizer.vocab_size} ids); drop --vocab_size")
    cfg.model.vocab_size = tokenizer.vocab_size
    return tokenizer


def claim_out_dir(cfg: Config, resumed: bool, parent_path: str | None, log) -> RunLock:
    """Check everything the run needs (check_run_inputs), then lock out_dir for it and mark it as
    minilm's (minilm/run_dir.py). A refused run has written nothing; the previous run's files are
    deleted later, once this run's data is ready (prepare_and_train)."""
    check_run_inputs(cfg, resumed, parent_path)
    check_writable(cfg.train.out_dir)
    lock = RunLock.acquire(cfg.train.out_dir)
    try:   # again under the lock: the folder is this run's to judge now
        check_run_dir(cfg.train.out_dir, fresh=not resumed, overwrite=cfg.train.overwrite,
                      keep=(parent_path,) if parent_path else ())
        mark_run_dir(cfg.train.out_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def check_run_inputs(cfg: Config, resumed: bool, parent_path: str | None) -> None:
    """Everything a run needs that reading can check, before anything in out_dir is written or
    deleted: the folder may take this run (run_dir.check_run_dir); for a fresh run, --data and
    --val_data resolve, lie outside out_dir, and hold the fields the objective reads in their
    first rows. Writes nothing. (A resumed run's data is checked against its checkpoint.)"""
    out = cfg.train.out_dir
    if not resumed:
        for flag, path in (("--data", cfg.data.data), ("--val_data", cfg.data.val_data)):
            if path:
                check_data_outside(out, flag, path)
        check_first_rows(cfg, source_files(cfg))
    check_run_dir(out, fresh=not resumed, overwrite=cfg.train.overwrite, keep=(parent_path,) if parent_path else ())


def check_first_rows(cfg: Config, files: list[str]) -> None:
    """Each file's first row has the fields the objective reads (--text_field of JSON, CSV or TSV
    text; the columns and --label_field of a table's rows): a missing one is refused before the
    tokenizer trains, not after."""
    spec = row_spec(cfg)
    if spec is None:
        for path in files:
            if file_format(path) != "text":
                next(iter_texts(path, cfg.data.text_field, files=[path]), None)
        return
    columns, optional, label_column = spec
    wanted = columns + ([(label_column, "--label_field")] if label_column else [])
    for path in files or [BUILTIN]:   # the built-in corpus has no rows: iter_rows says so
        next(iter_rows(path, wanted, optional=optional, files=None if path == BUILTIN else [path]), None)


def clear_earlier_run(cfg: Config, log) -> None:
    """A fresh run, its data prepared and its model built: delete what an earlier run left in
    out_dir (with --overwrite its checkpoints; always its metrics and temporaries). Only now, so
    that a run stopped by bad input or a bad flag on the way here loses nothing. The tokenizer
    and token files are this run's by now (reused, or made again)."""
    deleted = clear_previous_run(cfg.train.out_dir)
    if deleted:
        checkpoints = [name for name in deleted if name.startswith("ckpt-")]
        parts = ([f"{len(checkpoints)} checkpoint(s)"] if checkpoints else []) + \
            [name for name in deleted if not name.startswith("ckpt-")]
        log(f"{'--overwrite: ' if cfg.train.overwrite else ''}deleted {', '.join(parts)} of the previous run "
            f"in {cfg.train.out_dir}")


def prepare_and_train(cfg: Config, dist_info: DistInfo, log, state, ckpt_path, parent, parent_path,
                      given_tokenizer: Tokenizer | None = None) -> None:
    info = run_info(dist_info.world_size)
    log(cfg.describe())
    log("run: " + "  ".join(f"{k}={v}" for k, v in info.items()))

    given = None
    if state is not None:
        given = Tokenizer(tensor_to_bytes(state["tokenizer"]))
    elif parent is not None:
        given = Tokenizer(tensor_to_bytes(parent["tokenizer"]))
    elif given_tokenizer is not None:
        given = given_tokenizer
    # rank 0 trains the tokenizer (unless given one) and tokenizes the data; the others wait, then
    # load what it wrote
    if state is not None:
        tokenizer = on_main(lambda: data_for_resume(cfg, given, state, ckpt_path, log), dist_info)
    else:
        tokenizer = on_main(lambda: tokenizer_and_data(cfg, log, tokenizer=given), dist_info)
    data_dir = os.path.join(cfg.train.out_dir, "data")
    if tokenizer is None:
        tokenizer = given if given is not None else Tokenizer.load(os.path.join(cfg.train.out_dir, "tokenizer.model"))
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model expects vocab_size "
                        f"{cfg.model.vocab_size}; use a fresh --out_dir")
    if cfg.train.max_steps == 0:
        if state is None:
            on_main(lambda: clear_earlier_run(cfg, log), dist_info)
        log(f"--max_steps 0: the tokenizer and token files are ready in {cfg.train.out_dir}; nothing to train")
        return
    if cfg.train.objective == "classify":
        cfg.obj.labels = labels_of_data(cfg, data_dir, log)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    if parent is not None:
        load_parent_weights(objective, parent, parent_path, log)
        warn_if_parent_learned_nothing(parent, parent_path, log)
    # the raw tokens a row takes: seq_len + 1, or more for t5 (its spans shrink into sentinels)
    window = window_length_for(cfg.train.objective, cfg.model, cfg.obj)
    train_source = make_source(objective.data, data_dir, "train", cfg.model.seq_len, cfg.train.batch_size,
                               seed=cfg.train.seed, log=log, window_length=window)
    # validation windows do not depend on the training seed: runs with different seeds compare
    val_source = make_source(objective.data, data_dir, "val", cfg.model.seq_len, cfg.train.batch_size, seed=0,
                             log=log, window_length=window)
    torch.manual_seed(mix_seed(cfg.train.seed, dist_info.rank))  # dropout noise differs across ranks
    provenance = {"data": data_provenance(data_dir) if dist_info.is_main else None}
    if parent is not None:
        provenance["parent"] = {"path": os.path.abspath(parent_path), "step": int(parent.get("step") or 0),
                                "objective": parent.get("objective", "")}
    trainer = Trainer(cfg, objective, train_source, val_source, tokenizer, log=log, dist_info=dist_info,
                      provenance=provenance)
    if state is not None:
        trainer.load(ckpt_path, state)
        log(f"resumed from {ckpt_path} at step {trainer.step}")
        if dist_info.is_main:
            dropped = keep_metrics_up_to(cfg.train.out_dir, trainer.step)
            if dropped:
                log(f"metrics.jsonl: dropped {dropped} row(s) logged after step {trainer.step}, which this run redoes")
    else:
        on_main(lambda: clear_earlier_run(cfg, log), dist_info)
    trainer.fit()
    if trainer.stop_signal is not None:
        raise SystemExit(128 + int(trainer.stop_signal))
    ev = trainer.last_eval
    if "confusion" in trainer.last_eval_sums:   # classify: the confusion matrix of the last evaluation
        from minilm.objectives.classify import format_confusion
        log("confusion matrix of the validation rows (rows: true label, columns: predicted):\n"
            + format_confusion(trainer.last_eval_sums["confusion"], objective.label_names))
    if ev and "loss" in ev:
        log(f"done: val loss {ev['loss']:.4f}" + (f", bits per byte {ev['bpb']:.4f}" if "bpb" in ev else "")
            + (f", acc {ev['acc']:.4f}, macro-F1 {ev['macro_f1']:.4f} (best {trainer.best_value:.4f}: "
               f"{os.path.join(cfg.train.out_dir, 'best.pt')})" if "macro_f1" in ev else "")
            + f"; checkpoints in {cfg.train.out_dir}")


# ----------------------------------------------------------------------------- classify
def classifier_options(options, parent: dict | None):
    """classify's `auto` options made concrete (minilm/objectives/classify.py, resolve_options):
    an --init_from parent's backbone says how the classifier reads (causal for clm) and pools
    (whether its pretraining taught the first position anything)."""
    from minilm.objectives import objective_class
    from minilm.objectives.classify import resolve_options
    if parent is None:
        return resolve_options(options)
    parent_cfg = Config.from_dict(parent["config"])
    parent_objective = parent.get("objective") or parent_cfg.train.objective
    classes = [objective_class(part) for part in parent_objective.split("+")]
    trained_first = any(cls.trains_first_position(parent_cfg.obj) for cls in classes)
    return resolve_options(options, classes[0].model_kind, parent_cfg.obj, trained_first)


def labels_of_data(cfg: Config, data_dir: str, log) -> str:
    """The label names of the prepared labelled data, as --labels' JSON list. A run that already
    has labels (given as --labels, or a resumed checkpoint's) must find exactly those, in that
    order: the head's outputs mean those labels."""
    from minilm.data import load_meta
    from minilm.objectives.classify import parse_labels
    names = list((load_meta(data_dir) or {}).get("labels") or [])
    found = json.dumps(names, ensure_ascii=False)
    parse_labels(found)   # two labels or more
    if cfg.obj.labels and parse_labels(cfg.obj.labels) != names:
        raise UserError(f"the labelled data has the labels {found} but the model's are {cfg.obj.labels}; "
                        "the head's outputs mean those labels: give data with the same labels (or drop --labels)")
    log(f"classify: {len(names)} labels: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}")
    return found


# ----------------------------------------------------------------------------- resume and --init_from
MODEL_FIELDS_FREE = {"dropout"}   # the only model field a resumed or --init_from run may change
DATA_FIELDS_FREE = {"num_workers"}


def differing_fields(section_a, section_b, free: set[str]) -> list[tuple[str, object, object]]:
    """(name, value in a, value in b) for the fields of two config sections that differ."""
    return [(f.name, getattr(section_a, f.name), getattr(section_b, f.name)) for f in dataclasses.fields(section_a)
            if f.name not in free and getattr(section_a, f.name) != getattr(section_b, f.name)]


def config_for_resume(argv: list[str], state: dict, ckpt_path: str) -> Config:
    """The checkpoint's config with this command line's flags on top (a longer --max_steps, a new
    --lr). What made the checkpoint cannot change: the model (every field that changes the
    computed function; dropout may), the objective and the data. Values are compared, not flag
    names, so repeating the original command with --resume added is fine."""
    saved = Config.from_dict(state["config"])
    cfg = parse_overrides(argv, base=saved)
    objective = state.get("objective") or saved.train.objective
    if cfg.train.objective != objective:
        raise UserError(f"--objective cannot change when resuming ({ckpt_path} trains {objective}); to train "
                        f"{cfg.train.objective} from its weights, start a new run with --init_from {ckpt_path}")
    before = model_config_for(objective, saved.model)
    changed = differing_fields(before, model_config_for(objective, cfg.model), MODEL_FIELDS_FREE)
    if changed:
        name, old, new = changed[0]
        raise UserError(f"--{name} cannot change when resuming ({old} in {ckpt_path}, {new} asked): the model's "
                        "shape and function come from the checkpoint; start a new run to train another model")
    changed = differing_fields(saved.data, cfg.data, DATA_FIELDS_FREE)
    if changed:
        name, old, new = changed[0]
        raise UserError(f"--{name} cannot change when resuming ({old or 'the built-in corpus'!s} in {ckpt_path}, "
                        f"{new or 'the built-in corpus'!s} asked); to continue pretraining on new text, start a new "
                        f"run from its weights: --init_from {ckpt_path} --data NEW --out_dir NEW_FOLDER")
    return cfg


def data_for_resume(cfg: Config, tokenizer: Tokenizer, state: dict, ckpt_path: str, log) -> Tokenizer:
    """Make sure out_dir/data holds the tokens the checkpoint trained on, tokenized by its own
    tokenizer: reuse them when they are; otherwise prepare them again from --data with that
    tokenizer (a deleted or damaged data folder, data re-prepared by another tokenizer), but only
    when the source files are still the ones the checkpoint recorded."""
    data_dir = os.path.join(cfg.train.out_dir, "data")
    recorded = state.get("data") or {}
    meta, damage = inspect_prepared(data_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    source = cfg.data.data or BUILTIN

    def source_changed() -> bool:
        return data_signature(source, source_files(cfg)) != recorded["signature"]

    if (meta is not None and meta.get("tokenizer") == fingerprint and not typed_specials_may_be_ids(meta, tokenizer)
            and meta.get("signature") == recorded.get("signature", meta.get("signature"))):
        log(f"reusing {data_dir} ({meta['train_tokens']:,} train tokens), made by the checkpoint's tokenizer")
        try:
            if "signature" in recorded and source_changed():
                log(f"note: --data {source} changed since {ckpt_path} was written; this run goes on with the tokens "
                    f"the checkpoint trained on (to train on the new text: --init_from {ckpt_path})")
        except UserError:
            log(f"note: --data {source} is gone; this run goes on with the prepared tokens in {data_dir}")
        return tokenizer
    why = (f"is damaged ({damage})" if damage else "is missing" if meta is None
           else "was made by another tokenizer" if meta.get("tokenizer") != fingerprint
           else "was made from other data" if meta.get("signature") != recorded.get("signature", meta.get("signature"))
           else "was tokenized before typed special tokens were kept out of the special ids")
    if "signature" in recorded:
        if source_changed():
            raise UserError(f"{data_dir} {why} and --data {source} changed since {ckpt_path} was written, so the "
                            f"tokens it trained on cannot be made again; to continue pretraining on this text, start "
                            f"a new run from its weights: --init_from {ckpt_path} --out_dir NEW_FOLDER")
    log(f"{data_dir} {why}: preparing it again with the checkpoint's tokenizer")
    return tokenizer_and_data(cfg, log, tokenizer=tokenizer)


def data_provenance(data_dir: str) -> dict | None:
    """What a checkpoint records of its data, for --resume to check: meta.json's fingerprints."""
    meta = inspect_prepared(data_dir)[0] or {}
    keys = ("signature", "tokenizer", "train_tokens", "val_tokens", "source")
    return {k: meta[k] for k in keys if k in meta} or None


def config_for_init(argv: list[str], parent: dict, parent_path: str, log=print) -> Config:
    """A new run's config for --init_from: the parent's model (its tokenizer fixes vocab_size, its
    weights the shape; dropout may change) and, unless --objective is given, its objective (and
    --objective_weights), said on `log`; everything else from this command line. A classifier is
    never inherited: the child of a classify run names its objective. classify takes an
    encoder-decoder's (t5's) encoder stack: the parent's model without its decoder."""
    saved = Config.from_dict(parent["config"])
    parent_objective = parent.get("objective") or saved.train.objective
    base = Config(model=copy.deepcopy(saved.model))
    if "objective" not in explicit_flags(argv):
        if parent_objective == "classify":
            raise UserError(f"--init_from {parent_path} is a classifier: pass --objective classify to fine-tune it "
                            "again, or a pretraining --objective to train its backbone")
        base.train.objective = parent_objective
        if "objective_weights" not in explicit_flags(argv):
            base.obj.objective_weights = saved.obj.objective_weights
        log(f"--init_from: training {parent_objective}, the objective of {parent_path} (pass --objective to train "
            "another)")
    encoder_only = (parse_overrides(argv, base=base).train.objective == "classify"   # classify: t5's encoder
                    and is_encoder_decoder(parent_objective))
    if encoder_only:
        base.model.n_decoder_layer = 0
    wanted = parse_overrides(argv, base=base)
    if not encoder_only and is_encoder_decoder(parent_objective) != is_encoder_decoder(wanted.train.objective):
        shapes = ("an encoder-decoder", "a single stack") if is_encoder_decoder(parent_objective) else \
            ("a single stack", "an encoder-decoder")
        raise UserError(f"--init_from {parent_path}: its {parent_objective} model is {shapes[0]} but "
                        f"{wanted.train.objective} trains {shapes[1]}; the weights do not carry over (start from a "
                        f"checkpoint of the same kind, or train from scratch)")
    parent_model = model_config_for(parent_objective, saved.model)
    if encoder_only:
        parent_model = dataclasses.replace(parent_model, n_decoder_layer=0)
    new_model = model_config_for(wanted.train.objective, wanted.model)
    changed = differing_fields(parent_model, new_model, MODEL_FIELDS_FREE)
    if changed:
        name, old, new = changed[0]
        asked = f"--{name} {new} was asked" if name in explicit_flags(argv) or "preset" in explicit_flags(argv) \
            else f"{wanted.train.objective} needs {name}={new}"
        raise UserError(f"--init_from {parent_path}: its {parent_objective} backbone has {name}={old} but {asked}; "
                        "the weights only fit the same model (pick an objective with a matching backbone, or "
                        "train from scratch)")
    wanted.model = new_model
    wanted.train.init_from = parent_path
    return wanted


def load_parent_weights(objective, parent: dict, parent_path: str, log) -> None:
    """--init_from: the parent's backbone, all of it, and the head tensors whose names and shapes
    match (the same objective, or a masked LM into another masked LM, keeps its LM head); any other
    head starts from scratch. Keys are compared per part: "backbone.*", and a head's name inside
    its objective (a single objective's "head.x" is part NAME's "parts.NAME.head.x" in a+b)."""
    parent_objective = parent.get("objective") or Config.from_dict(parent["config"]).train.objective

    def by_part(state: dict, name: str) -> dict:
        out = {}
        for key in state:
            if key.startswith("backbone."):
                out[("", key)] = key
            elif key.startswith("parts."):
                part, _, rest = key[len("parts."):].partition(".")
                out[(part, rest)] = key
            else:
                out[(name, key)] = key
        return out

    source, own = parent["model"], objective.state_dict()
    # --- classify: t5's encoder stack is the backbone; another label set's head starts afresh ---
    encoder_only = is_encoder_decoder(parent_objective) and not is_encoder_decoder(objective.name)
    if encoder_only:   # backbone.encoder.X -> backbone.X (the token table is shared with the decoder)
        source = {"backbone." + key[len("backbone.encoder."):]: value for key, value in source.items()
                  if key.startswith("backbone.encoder.")}
    if parent_objective == "classify" and hasattr(objective, "label_names"):
        parent_labels = Config.from_dict(parent["config"]).obj.labels
        if parent_labels != json.dumps(objective.label_names, ensure_ascii=False):
            source = {key: value for key, value in source.items() if not key.startswith("label_head.")}
    # --- end classify ---
    parent_keys, own_keys = by_part(source, parent_objective), by_part(own, objective.name)
    single = "+" not in parent_objective and "+" not in objective.name
    take, missing = {}, []
    for (part, rest), key in own_keys.items():
        match = parent_keys.get((part, rest)) or (parent_keys.get((parent_objective, rest)) if single and part else None)
        if match is not None and source[match].shape == own[key].shape:
            take[key] = source[match]
        elif not part and not key.startswith("backbone.head_project."):   # the LM head's C -> E (model.py),
            missing.append(key)                                           # absent where no LM head ran (rtd)
    if missing:
        raise UserError(f"--init_from {parent_path}: its backbone does not fit a {objective.name} model "
                        f"({missing[0]} missing or shaped differently); the backbones must match")
    objective.load_state_dict(take, strict=False)
    heads = sum(1 for key in take if not key.startswith("backbone."))
    fresh = sum(1 for key in own if key not in take)
    log(f"initialized from {parent_path} (step {int(parent.get('step') or 0)}, {parent_objective}): the backbone"
        + (" (its encoder stack)" if encoder_only else "")
        + (f", {heads} head tensor(s)" if heads else "") + (f"; {fresh} tensor(s) start from scratch" if fresh else ""))


def setup_device_name(name: str, dist_info: DistInfo) -> str:
    """Under torchrun each process owns one GPU, whatever the checkpoint's config said."""
    if dist_info.enabled and torch.cuda.is_available() and not name.startswith("cpu"):
        return f"cuda:{dist_info.local_rank}"
    return name


if __name__ == "__main__":
    run_cli(main)
