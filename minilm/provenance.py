"""Where a run comes from, and whether it may go on from there: the plumbing train.py calls so
that it can read as config -> tokenizer and data -> objective -> Trainer.

    cfg, start = resolve_start(cfg, argv, dist_info, log)   # --resume / --init_from: their config, checked
    lock = claim_out_dir(cfg, start)      # every input checked, then out_dir locked (run_dir.py)
    tokenizer = tokenizer_and_data(cfg, log)             # reuse out_dir's prepared data, or make it again
    tokenizer = data_for_resume(cfg, tokenizer, state, path, log)   # the tokens a checkpoint trained on
    load_parent_weights(objective, parent, parent_path, log)        # --init_from: the parent's backbone

Why each rule exists:
  * Prepared data is reused only when it was made from the same files (paths, sizes, modification
    times: data_signature), vocab size and preparation flags (prepare_settings), by the same
    tokenizer; otherwise it is made again and the log says why (why_prepare_again).
  * --resume continues one run: the model, the objective and the data cannot change
    (config_for_resume); the checkpoint's tokens are made again only from the same source files
    (data_for_resume).
  * --init_from starts a new run from a checkpoint's weights: its tokenizer and model come along,
    the backbone must fit (config_for_init), and the objective decides which of the parent's
    tensors it takes (Objective.parent_tensors, reads_encoder_stack). A Hugging Face folder
    (config.json inside: minilm/hf_import.py) is read as a parent checkpoint of the objective its
    class is the head of, so the same rules hold (never another objective unless --objective says
    so); its --seq_len may be shorter than its max_position_embeddings (parent_from_folder).
  * Token files an older minilm made may hold special ids where text only spelled "<mask>": they
    are tokenized again with the same tokenizer (typed_specials_may_be_ids).
  * Every input a fresh run reads is checked (its files resolve, lie outside out_dir, and hold
    the fields the objective reads in their first rows) before anything in out_dir is written.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import signal
import sys

import torch

from minilm.checkpoint import load_checkpoint, load_checkpoint_or_newest, newest_loadable, tensor_to_bytes
from minilm.config import FRESH_START, Config, explicit_flags, parse_overrides
from minilm.data import (BUILTIN, PROGRESS_EVERY, Stopped, display, file_format, inspect_prepared, iter_rows,
                         iter_texts, prepare, prepare_rows, resolve_files, row_texts, source_class, stop_on_sigterm,
                         tokenizer_fingerprint, tokenizer_texts)
from minilm.distributed import DistInfo
from minilm.errors import UserError
from minilm.hf_import import is_hf_folder, parent_checkpoint, read_folder
from minilm.objectives import OBJECTIVES, data_kind_for, is_encoder_decoder, model_config_for, objective_class
from minilm.run_dir import DATA_NAME, TOKENIZER_NAME, RunLock, check_data_outside, claim_run_dir
from minilm.tokenizer import Tokenizer, tokenizer_from_bytes


# ----------------------------------------------------------------------------- prepared data: reuse or make again
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


# ----------------------------------------------------------------------------- where a run starts
@dataclasses.dataclass
class Start:
    """Where a run starts: from scratch (all None), from a checkpoint it resumes (`state`, read from
    `path`), or from an --init_from parent's weights (`parent`, read from `parent_path`)."""
    state: dict | None = None
    path: str | None = None
    parent: dict | None = None
    parent_path: str | None = None

    @property
    def parent_config(self) -> Config | None:
        """The parent's config, its train.objective the objective the parent trained; None without one."""
        return None if self.parent is None else parent_config(self.parent)

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer the checkpoint carries (the resumed one's, else the parent's), or None."""
        carrier = self.state if self.state is not None else self.parent
        return None if carrier is None else tokenizer_from_bytes(tensor_to_bytes(carrier["tokenizer"]))


def parent_config(parent: dict) -> Config:
    """A checkpoint's config, with train.objective the objective it trained."""
    cfg = Config.from_dict(parent["config"])
    cfg.train.objective = parent.get("objective") or cfg.train.objective
    return cfg


def wants_resume(value: str) -> str | None:
    """--resume value -> None (fresh start), "auto" or a checkpoint path."""
    low = value.strip().lower()
    if low in FRESH_START:
        return None
    if low in ("auto", "true", "1", "yes", "on"):
        return "auto"
    return value


def resolve_start(cfg: Config, argv: list[str], dist_info: DistInfo, log) -> tuple[Config, Start]:
    """The run's config and where it starts: `cfg` (this command line's flags) for a fresh run; for
    --resume, the checkpoint's config with these flags on top (config_for_resume); for --init_from,
    the parent's model with this command line's training (config_for_init)."""
    resume = wants_resume(cfg.train.resume)
    if resume is not None and cfg.train.init_from:
        raise UserError("--resume continues a run, --init_from starts a new one from a checkpoint's weights; "
                        "pass one of them")
    if resume is not None:
        if resume == "auto":
            path, state = newest_loadable(cfg.train.out_dir, log=log)
        else:
            path, state = resume, load_checkpoint(resume, resumable=True, flag="--resume")
        if state.get("tokenizer") is None:
            raise UserError(f"{path} carries no tokenizer, so train.py cannot resume from it; start a new run")
        cfg = config_for_resume(argv, state, path)
        cfg.train.device = setup_device_name(cfg.train.device, dist_info)
        return cfg, Start(state=state, path=path)
    if cfg.train.init_from and is_hf_folder(cfg.train.init_from):
        parent_path, parent = cfg.train.init_from, parent_from_folder(cfg.train.init_from, argv, cfg, log)
        return config_for_init(argv, parent, parent_path, log), Start(parent=parent, parent_path=parent_path)
    if cfg.train.init_from:
        parent_path, parent = load_checkpoint_or_newest(cfg.train.init_from, log=log, flag="--init_from")
        if parent.get("tokenizer") is None:
            raise UserError(f"{parent_path} carries no tokenizer, so --init_from cannot reuse it; pass a "
                            "checkpoint written by train.py")
        return config_for_init(argv, parent, parent_path, log), Start(parent=parent, parent_path=parent_path)
    return cfg, Start()


def parent_from_folder(folder: str, argv: list[str], cfg: Config, log) -> dict:
    """A Hugging Face folder read as an --init_from parent checkpoint (hf_import.py). Its
    seq_len is its max_position_embeddings (Llama's may be 100k and more); a shorter --seq_len
    keeps the first rows of a learned position table, which is exact for every position the run
    uses. A longer one is refused by config_for_init, as for any parent."""
    imported = read_folder(folder)
    model = imported.model_cfg
    if "seq_len" in explicit_flags(argv) and cfg.model.seq_len < model.seq_len:
        imported.model_cfg = dataclasses.replace(model, seq_len=cfg.model.seq_len)
        table = imported.state_dict.get("backbone.pos_emb.weight")
        if table is not None:
            imported.state_dict["backbone.pos_emb.weight"] = table[:cfg.model.seq_len].clone()
    log(f"--init_from {folder}: {imported.architecture} ({imported.arch}, {model.n_layer} layers, {model.n_embd} wide, "
        f"{imported.model_cfg.vocab_size} token ids)" + (f"; not used: {len(imported.unused)} tensor(s) "
                                                         f"({imported.unused[0]}, ...)" if imported.unused else ""))
    return parent_checkpoint(imported, folder)


def setup_device_name(name: str, dist_info: DistInfo) -> str:
    """Under torchrun each process owns one GPU, whatever the checkpoint's config said."""
    if dist_info.enabled and torch.cuda.is_available() and not name.startswith("cpu"):
        return f"cuda:{dist_info.local_rank}"
    return name


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
    before = model_config_for(objective, saved.model, saved.obj)
    changed = differing_fields(before, model_config_for(objective, cfg.model, cfg.obj), MODEL_FIELDS_FREE)
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
    --objective_weights), said on `log`; everything else from this command line. An objective
    may refuse to be inherited (Objective.why_not_inherited: the child of a classifier names its
    objective), and one that reads_encoder_stack takes an encoder-decoder's encoder stack: the
    parent's model without its decoder."""
    saved = parent_config(parent)
    parent_objective = saved.train.objective
    base = Config(model=copy.deepcopy(saved.model))
    if "objective" not in explicit_flags(argv):
        for part in parent_objective.split("+"):
            refusal = objective_class(part).why_not_inherited(parent_path)
            if refusal:
                raise UserError(refusal)
        base.train.objective = parent_objective
        if "objective_weights" not in explicit_flags(argv):
            base.obj.objective_weights = saved.obj.objective_weights
        log(f"--init_from: training {parent_objective}, the objective of {parent_path} (pass --objective to train "
            "another)")
    encoder_only = is_encoder_decoder(parent_objective) and reads_encoder_stack(parse_overrides(argv, base=base))
    if encoder_only:
        base.model.n_decoder_layer = 0
    wanted = parse_overrides(argv, base=base)
    if not encoder_only and is_encoder_decoder(parent_objective) != is_encoder_decoder(wanted.train.objective):
        shapes = ("an encoder-decoder", "a single stack") if is_encoder_decoder(parent_objective) else \
            ("a single stack", "an encoder-decoder")
        raise UserError(f"--init_from {parent_path}: its {parent_objective} model is {shapes[0]} but "
                        f"{wanted.train.objective} trains {shapes[1]}; the weights do not carry over (start from a "
                        f"checkpoint of the same kind, or train from scratch)")
    parent_model = model_config_for(parent_objective, saved.model, saved.obj)
    if encoder_only:
        parent_model = dataclasses.replace(parent_model, n_decoder_layer=0)
    new_model = model_config_for(wanted.train.objective, wanted.model, wanted.obj)
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


def reads_encoder_stack(cfg: Config) -> bool:
    """Whether cfg's objective, started from an encoder-decoder, takes its encoder stack as its
    backbone (Objective.reads_encoder_stack)."""
    return cfg.train.objective in OBJECTIVES and objective_class(cfg.train.objective).reads_encoder_stack


def load_parent_weights(objective, parent: dict, parent_path: str, log) -> None:
    """--init_from: the parent's backbone, all of it, and the head tensors whose names and shapes
    match (the same objective, or a masked LM into another masked LM, keeps its LM head); any other
    head starts from scratch. Keys are compared per part: "backbone.*", and a head's name inside
    its objective (a single objective's "head.x" is part NAME's "parts.NAME.head.x" in a+b). The
    parent's tensors are an encoder-decoder's encoder stack for a single-stack child (config_for_init
    allowed it: reads_encoder_stack), and the objective may set some aside (Objective.parent_tensors:
    a classifier's head of another label set)."""
    saved = parent_config(parent)
    parent_objective = saved.train.objective

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
    encoder_only = is_encoder_decoder(parent_objective) and not is_encoder_decoder(objective.name)
    if encoder_only:   # backbone.encoder.X -> backbone.X (the token table is shared with the decoder)
        source = {"backbone." + key[len("backbone.encoder."):]: value for key, value in source.items()
                  if key.startswith("backbone.encoder.")}
    source = objective.parent_tensors(source, saved)
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


def run_provenance(data_dir: str, start: Start, is_main: bool) -> dict:
    """What every checkpoint of this run records of where it came from (Trainer's provenance): the
    prepared data's fingerprints, for --resume to check, and an --init_from run's parent."""
    provenance = {"data": data_provenance(data_dir) if is_main else None}
    if start.parent is not None:
        provenance["parent"] = {"path": os.path.abspath(start.parent_path), "step": int(start.parent.get("step") or 0),
                                "objective": start.parent.get("objective", "")}
    return provenance


# ----------------------------------------------------------------------------- before anything is written
def claim_out_dir(cfg: Config, start: Start) -> RunLock:
    """Check everything the run reads (check_run_inputs), then lock out_dir for it and mark it as
    minilm's (run_dir.claim_run_dir). A refused run has written nothing; the previous run's files
    are deleted later, once this run's data is ready (run_dir.clear_earlier_run)."""
    resumed = start.state is not None
    keep = (start.parent_path,) if start.parent_path else ()
    check_run_inputs(cfg, resumed)
    return claim_run_dir(cfg.train.out_dir, fresh=not resumed, overwrite=cfg.train.overwrite, keep=keep)


def check_run_inputs(cfg: Config, resumed: bool) -> None:
    """What a fresh run reads, checked before anything in out_dir is written or deleted: --data and
    --val_data resolve, lie outside out_dir, and hold the fields the objective reads in their first
    rows. Writes nothing. (A resumed run's data is checked against its checkpoint.)"""
    if resumed:
        return
    for flag, path in (("--data", cfg.data.data), ("--val_data", cfg.data.val_data)):
        if path:
            check_data_outside(cfg.train.out_dir, flag, path)
    check_first_rows(cfg, source_files(cfg))


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
