"""Objectives by name: one line per objective in the registry below, an explicit table rather than
import-time magic, so a reader sees every objective in one place.

Adding one: write minilm/objectives/NAME.py with a subclass of `Objective` (base.py: the contract),
then add its line here. Code outside the library (a test, a user's script) calls `register(cls)`
instead: the flags, --help, config validation and the saved config's options are built from the
registered objectives' Options when they are used, so a registered objective's options are flags.

"a+b" (e.g. "mlm+sop") trains several objectives on one backbone, weighted by
--objective_weights: see multitask.py.

model_config_for(name, model_cfg) is the model an objective really builds: the config after the
objective's `configure` (base.py). train.py resolves its config with it before printing and
saving; build_objective applies it too (it is idempotent)."""
from __future__ import annotations

import dataclasses
import difflib

from minilm.errors import UserError
from minilm.objectives.base import IGNORE, Objective, check_rows_fit, finalize, resolve_model_config
from minilm.objectives.classify import Classifier
from minilm.objectives.clm import CausalLM
from minilm.objectives.mlm import MaskedLM
from minilm.objectives.multitask import MultiTask, check_parts, common_data
from minilm.objectives.plm import PermutationLM
from minilm.objectives.prefix_lm import PrefixLM
from minilm.objectives.rtd import ReplacedTokenDetection
from minilm.objectives.simcse import SimCSE, SupervisedSimCSE
from minilm.objectives.sop import SentenceOrder
from minilm.objectives.span import SpanMaskedLM
from minilm.objectives.t5 import SpanCorruption
from minilm.objectives.tlm import TranslationLM
from minilm.objectives.ul2 import MixtureOfDenoisers
from minilm.objectives.wwm import WholeWordMaskedLM
from minilm.options import merge_fields

OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Make objective `cls` trainable as --objective cls.name (replacing one of that name) and its
    Options fields flags. ValueError, before anything changes, for a name that cannot be a flag
    value, Options that are not a dataclass of option() fields or that declare a field another
    registered objective declares too (share it by inheritance instead), or `defaults` naming no
    ModelConfig or TrainConfig field. Returns `cls`, so it can decorate the class."""
    from minilm.config import ModelConfig, TrainConfig
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"register takes a subclass of minilm.objectives.Objective, got {cls!r}")
    if not cls.name or "+" in cls.name or cls.name != cls.name.strip():
        raise ValueError(f"{cls.__qualname__}.name must be a name without '+' or spaces, got {cls.name!r}")
    others = [c for name, c in OBJECTIVES.items() if name != cls.name]
    merge_fields(option_classes(others + [cls]))
    shared = {f.name for section in (ModelConfig, TrainConfig) for f in dataclasses.fields(section)}
    unknown = sorted(set(cls.defaults) - shared)
    if unknown:
        raise ValueError(f"{cls.__qualname__}.defaults names --{unknown[0]}, which is no ModelConfig or "
                         "TrainConfig field")
    OBJECTIVES[cls.name] = cls
    return cls


def option_classes(classes=None) -> list[type]:
    """The Options classes behind the objective section of a Config (config.ObjectiveConfig): a+b's
    own, then each registered objective's (or each of `classes`'), each once, in registry order."""
    found = [MultiTask.Options]
    for cls in (OBJECTIVES.values() if classes is None else classes):
        if cls.Options not in found:
            found.append(cls.Options)
    return found


register(CausalLM)
register(MaskedLM)
register(WholeWordMaskedLM)
register(SpanMaskedLM)
register(SentenceOrder)
register(PrefixLM)
register(SpanCorruption)
register(ReplacedTokenDetection)
register(PermutationLM)
register(Classifier)                 # fine-tuning a classification head
register(SimCSE)                     # contrastive sentence embeddings, from sentences
register(SupervisedSimCSE)           # ... or from (anchor, positive) rows
register(TranslationLM)
register(MixtureOfDenoisers)         # UL2's mixture of denoisers


def model_config_for(name: str, model_cfg, options=None):
    """The ModelConfig that objective `name` ("mlm", "mlm+sop", ...) builds from `model_cfg`: a
    copy with what its parts need (their configure; `options`: the run's objective section, or the
    defaults when None). Idempotent, and the same for "a+b" and "b+a". One-line UserErrors for an
    unknown name or parts that cannot share one model."""
    classes = [objective_class(part) for part in name.split("+")]
    if len(classes) > 1:
        check_parts(classes)
    return resolve_model_config(classes, model_cfg, options)


def model_defaults_for(name: str, model_cfg, given: set[str]):
    """A copy of model_cfg with objective `name`'s `defaults` for the ModelConfig fields not in
    `given` (the flags on the command line, config.explicit_flags; simcse's dropout 0.1). train.py
    applies it to a fresh run, never on --resume, whose checkpoint's config already holds what its
    run chose. Parts of "a+b" that default one field differently: a UserError asking for the flag."""
    return _defaults_for(name, model_cfg, given)


def train_defaults_for(name: str, train_cfg, given: set[str]):
    """The same for TrainConfig fields (an objective's own learning rate): a copy of train_cfg,
    checked again (--min_lr must stay at most --lr). A default the flags cannot live with (clm's
    Muon beside --fsdp) is the check's one-line error, naming the default and asking for the flag."""
    defaulted = _defaults_for(name, train_cfg, given)
    try:
        defaulted.validate()
    except UserError as err:
        dataclasses.replace(train_cfg).validate()   # the flags alone at fault: their own error (on a copy)
        taken = [f.name for f in dataclasses.fields(train_cfg) if getattr(defaulted, f.name) != getattr(train_cfg, f.name)]
        culprits = [n for n in taken if _valid(dataclasses.replace(defaulted, **{n: getattr(train_cfg, n)}))] or taken
        said = ", ".join(f"--{n} {getattr(defaulted, n)}" for n in culprits)
        raise UserError(f"{err} ({name} defaults {said}; pass the flag to choose)") from None
    return defaulted


def _valid(section) -> bool:
    try:
        dataclasses.replace(section).validate()   # on a copy: validate resolves `auto` fields in place
        return True
    except UserError:
        return False


def _defaults_for(name: str, section, given: set[str]):
    own = {f.name for f in dataclasses.fields(section)}
    chosen: dict = {}
    for cls in (objective_class(part) for part in name.split("+")):
        for setting, value in cls.defaults.items():
            if setting not in own:
                continue
            if setting in chosen and chosen[setting][1] != value and setting not in given:
                raise UserError(f"{chosen[setting][0]} defaults --{setting} to {chosen[setting][1]} but {cls.name} "
                                f"to {value}; pass --{setting} to choose")
            chosen[setting] = (cls.name, value)
    changes = {setting: value for setting, (_, value) in chosen.items() if setting not in given}
    return dataclasses.replace(section, **changes)


def window_length_for(name: str, model_cfg, options=None) -> int:
    """Raw tokens per row that objective `name` reads from a "blocks" source (Objective.
    window_length: seq_len + 1, or t5's longer window). Checks the objective's options against
    the model (every part's, and that --seq_len holds a row of the data they read), so train.py
    calls it before preparing any data. `model_cfg`: resolved."""
    classes = [objective_class(part) for part in name.split("+")]
    check_rows_fit(common_data(classes), model_cfg)
    lengths = [cls.window_length(model_cfg, options) for cls in classes]
    return lengths[0] if len(classes) == 1 else Objective.window_length(model_cfg)


def data_kind_for(name: str) -> str:
    """The data source objective `name` reads (a key of minilm.data.SOURCES)."""
    return common_data([objective_class(part) for part in name.split("+")])


def is_encoder_decoder(name: str) -> bool:
    """Whether objective `name` trains an encoder-decoder (model_kind "seq2seq": t5)."""
    return any(objective_class(part).model_kind == "seq2seq" for part in name.split("+"))


def build_objective(name: str, model_cfg, tokenizer=None, options=None) -> Objective:
    """`options`: the run's objective section (config.ObjectiveConfig; the defaults when None), from
    which the objective gets its own Options (each part of "a+b" its own). The model is built from
    model_config_for(name, model_cfg, options); `model_cfg` itself is not changed. A section is
    validated whole, as a command line is, whichever of its options the objective reads."""
    if options is not None and hasattr(options, "validate"):
        options.validate()
    model_cfg = model_config_for(name, model_cfg, options)
    if "+" in name:
        return MultiTask([objective_class(part) for part in name.split("+")], model_cfg, tokenizer, options)
    if getattr(options, "objective_weights", "").strip():
        raise UserError(f"--objective_weights is for combined objectives such as mlm+sop; {name} has one loss")
    cls = objective_class(name)
    return cls(model_cfg, tokenizer, cls.make_options(options))


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown --objective {name!r}{hint} (available: {', '.join(OBJECTIVES)}, "
                        "or several joined by +)")
    return OBJECTIVES[name]


__all__ = ["IGNORE", "OBJECTIVES", "Objective", "build_objective", "data_kind_for", "finalize", "is_encoder_decoder",
           "model_config_for", "model_defaults_for", "option_classes", "register", "train_defaults_for",
           "window_length_for"]
