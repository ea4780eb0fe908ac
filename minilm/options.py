"""Fields with a meaning and a rule: what every flag of train.py is made of.

A field is declared with option(default, meaning, rule): the meaning is what `train.py --help`
prints, the rule the values the field accepts on its own. Rules that tie two fields together
(n_embd divisible by n_head, min_lr <= lr, ...) are code, in each section's validate().

The four sections of minilm/config.py are made of them, and so is each objective's `Options`, a
dataclass in the objective's own file (minilm/objectives/):

    @dataclass
    class SentenceOrderOptions(Options):
        sentence_task: str = option("sop", "the sentence-pair head: ...", choices=("sop", "nsp"))

The run's objective section (config.ObjectiveConfig) is the union of the registered objectives'
Options (merge_fields), so each of their fields is a flag. No torch here: `import minilm.config`
stays light.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from minilm.errors import UserError


def option(default, meaning: str, *, at_least=None, above=None, within: str | None = None,
           choices: tuple[str, ...] | None = None, auto=None):
    """A config field with its meaning and, at most one of:
    at_least=x or above=x (a lower bound, inclusive or not); within="[a, b)" (an interval, its
    brackets saying which ends are included; a bound may be inf or a power like 2**64);
    choices=("a", "b") (a choice "name:N" also accepts name:0, name:1, ...).
    auto=v: the value that stands for the word "auto" on the command line (outside the rule; the
    config resolves it to a number, e.g. --warmup_steps)."""
    rule = {"at_least": at_least, "above": above, "within": within, "choices": choices, "auto": auto}
    return field(default=default, metadata={"help": meaning,
                                            **{k: v for k, v in rule.items() if v is not None}})


def _bound(text: str) -> float:
    base, _, power = text.strip().partition("**")
    return float(base) ** int(power) if power else float(base)


def check_value(name: str, value, *, at_least=None, above=None, within: str | None = None,
                choices: tuple[str, ...] | None = None) -> None:
    """UserError `--name must be <rule>, got <value>` when `value` breaks the rule (see option)."""
    if choices is not None:
        indexed = [c[:-2] for c in choices if c.endswith(":N")]  # "cuda:N": cuda:0, cuda:1, ...
        base, colon, index = str(value).partition(":")
        if value not in choices and not (colon and base in indexed and index.isdigit()):
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        return
    if within is not None:
        low, high = (_bound(b) for b in within[1:-1].split(","))
        ok = ((low < value if within[0] == "(" else low <= value)
              and (value < high if within[-1] == ")" else value <= high))
        requirement = f"in {within}"
    elif at_least is not None:
        ok, requirement = value >= at_least, f">= {at_least}"
    elif above is not None:
        ok, requirement = value > above, f"> {above}"
    else:
        ok, requirement = True, ""
    if isinstance(value, float) and not math.isfinite(value):  # nan compares false, inf may pass
        raise UserError(f"--{name} must be a finite number{' ' + requirement if requirement else ''}, "
                        f"got {value}")
    if not ok:
        raise UserError(f"--{name} must be {requirement}, got {value}")


TYPES = {"int": int, "float": float, "str": str, "bool": bool}  # the annotations, as strings
ARTICLE = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _fits(value, kind: type) -> bool:
    if isinstance(value, bool):  # bool is a subclass of int: True is no n_layer
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def type_name(f: dataclasses.Field) -> str:
    """A field's type as a key of TYPES: "int", whether its module postpones annotations (a
    string) or not (the type)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def check_fields(section) -> None:
    """Each field of a config section alone: its type, then its rule (option's metadata)."""
    for f in fields(section):
        value = getattr(section, f.name)
        if not _fits(value, TYPES[type_name(f)]):
            raise UserError(f"--{f.name} expects {ARTICLE[type_name(f)]}, got {value!r}")
        if "auto" in f.metadata and value == f.metadata["auto"]:
            continue
        rule = {k: v for k, v in f.metadata.items() if k not in ("help", "auto")}
        check_value(f.name, value, **rule)


# ----------------------------------------------------------------------------- an objective's options
@dataclass
class Options:
    """The base of an objective's options: no fields. A subclass declares its fields with option()
    and, for rules that tie fields together, extends validate() (calling super().validate())."""

    def validate(self) -> None:
        """A one-line UserError naming the flag of the first field out of its range, or of two
        fields that do not fit together."""
        check_fields(self)


def options_from(options_class: type, section):
    """An instance of `options_class` from `section`: None gives the defaults, an instance of it is
    used as it is, anything else (the run's whole objective section, another objective's options)
    gives the values of the fields it has (the others keep their defaults). Not validated."""
    if section is None:
        return options_class()
    if isinstance(section, options_class):
        return section
    return options_class(**{f.name: getattr(section, f.name) for f in fields(options_class)
                            if hasattr(section, f.name)})


def merge_fields(option_classes) -> list[dataclasses.Field]:
    """The fields of the Options classes `option_classes`, in order, each once: a field several
    classes share must be one declaration (a subclass inheriting it, as span's options inherit the
    masked LM's mask_prob), never two of the same name, which could disagree on the default, the
    meaning or the rule. ValueError naming both classes otherwise."""
    merged: dict[str, tuple[dataclasses.Field, type]] = {}
    for options_class in option_classes:
        if not dataclasses.is_dataclass(options_class):
            raise ValueError(f"{options_class.__qualname__} is not a dataclass: an objective's Options is a "
                             "@dataclass whose fields are made with minilm.options.option")
        for f in fields(options_class):
            if f.name in merged and merged[f.name][0] is not f:
                raise ValueError(f"--{f.name} is declared both by {merged[f.name][1].__qualname__} and by "
                                 f"{options_class.__qualname__}: declare it once and let the other Options "
                                 "inherit it (a subclass), or give it another name")
            if type_name(f) not in TYPES or "help" not in f.metadata:
                raise ValueError(f"{options_class.__qualname__}.{f.name} must be declared with "
                                 f"minilm.options.option and one of the types {', '.join(TYPES)}")
            merged.setdefault(f.name, (f, options_class))
    return [f for f, _ in merged.values()]
