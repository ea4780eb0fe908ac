"""minilm/objectives/__init__.py's register: an objective defined outside the library, with its
options in its own dataclass, becomes an --objective whose options are flags like every other
(parsed, validated, listed by --help, saved in the config's "obj" section), gets an instance of
its own Options, and has its configure and defaults applied. Two declarations of one field are
refused when the second is registered."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from minilm.config import Config, ModelConfig, TrainConfig, config_from_saved, help_text, parse_overrides
from minilm.errors import UserError
from minilm.objectives import (OBJECTIVES, build_objective, model_config_for, model_defaults_for, register,
                               train_defaults_for)
from minilm.objectives.base import Objective
from minilm.objectives.mlm import MaskedLMOptions
from minilm.options import Options, option

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@dataclass
class ToyOptions(Options):
    toy_rate: float = option(0.5, "toy: the share of something", within="(0, 1]")
    toy_low: int = option(1, "toy: the fewest segments", at_least=0)
    toy_high: int = option(3, "toy: the most segments, and the segment embeddings it needs", at_least=1)

    def validate(self) -> None:
        super().validate()
        if self.toy_low > self.toy_high:
            raise UserError(f"--toy_low must be at most --toy_high ({self.toy_high}), got {self.toy_low}")


class Toy(Objective):
    name = "toy"
    Options = ToyOptions
    defaults = {"dropout": 0.2, "lr": 1e-3}

    @classmethod
    def configure(cls, model_cfg, options):
        return dataclasses.replace(model_cfg, n_segment=max(model_cfg.n_segment, options.toy_high))

    def __init__(self, model_cfg, tokenizer=None, options=None):
        super().__init__()
        self.options = self.make_options(options)
        self.backbone = self.build_backbone(model_cfg)


@pytest.fixture
def registry():
    """The registry, restored after the test (so no other test sees a toy)."""
    saved = dict(OBJECTIVES)
    yield OBJECTIVES
    OBJECTIVES.clear()
    OBJECTIVES.update(saved)


def small() -> ModelConfig:
    return ModelConfig(vocab_size=160, seq_len=16, n_layer=1, n_head=2, n_embd=16)


def test_a_registered_objectives_options_are_flags(registry):
    with pytest.raises(UserError, match="unknown flag --toy_rate"):
        parse_overrides(["--toy_rate", "0.25"])
    assert register(Toy) is Toy and OBJECTIVES["toy"] is Toy
    fields = [f.name for f in dataclasses.fields(Config().obj)]
    assert fields[-3:] == ["toy_rate", "toy_low", "toy_high"]              # grouped, after the built-in ones
    assert fields[0] == "objective_weights" and "mask_prob" in fields      # the others stay
    assert (Config().obj.toy_rate, Config().obj.toy_high) == (0.5, 3)
    cfg = parse_overrides(["--objective", "toy", "--toy_rate", "0.25", "--toy-high=4"])
    assert (cfg.train.objective, cfg.obj.toy_rate, cfg.obj.toy_high) == ("toy", 0.25, 4)
    # --help lists them with their default and meaning
    lines = help_text().splitlines()
    assert any(ln.startswith("  --toy_rate 0.5 ") and ln.endswith("toy: the share of something") for ln in lines)
    # saved flat in "obj", as every option, and read back
    saved = cfg.to_dict()
    assert saved["obj"]["toy_rate"] == 0.25
    assert config_from_saved(saved).obj.toy_high == 4 and Config.from_dict(saved).obj.toy_rate == 0.25


def test_a_registered_objectives_options_are_validated(registry):
    register(Toy)
    with pytest.raises(UserError, match=r"^--toy_rate must be in \(0, 1\], got 2.0$"):
        parse_overrides(["--toy_rate", "2"])
    with pytest.raises(UserError, match=r"^--toy_high expects an integer, got 'many'$"):
        parse_overrides(["--toy_high", "many"])
    with pytest.raises(UserError, match=r"^--toy_low must be at most --toy_high \(3\), got 5$"):   # its validate()
        parse_overrides(["--toy_low", "5"])
    saved = parse_overrides([]).to_dict()
    saved["obj"]["toy_low"] = 7
    with pytest.raises(UserError, match="--toy_low must be at most --toy_high"):
        config_from_saved(saved)
    # the built-in objectives' own rules still run beside it
    with pytest.raises(UserError, match="--span_min_words <= --span_max_words"):
        parse_overrides(["--span_min_words", "4", "--span_max_words", "2"])


def test_a_registered_objective_gets_its_own_options_its_model_and_its_defaults(registry):
    register(Toy)
    section = parse_overrides(["--toy_high", "4", "--mask_prob", "0.3"]).obj
    objective = build_objective("toy", small(), None, section)
    assert type(objective.options) is ToyOptions and objective.options == ToyOptions(toy_high=4)
    assert build_objective("toy", small()).options == ToyOptions()          # no section: the defaults
    # its configure, with its options, is the model that is built, printed and saved
    assert objective.backbone.cfg.n_segment == 4
    resolved = model_config_for("toy", small(), section)
    assert resolved == dataclasses.replace(small(), n_segment=4) == model_config_for("toy", resolved, section)
    with pytest.raises(ValueError, match=r"toy needs a model config with n_segment>=3"):
        Toy(small())
    # its defaults for the shared flags, for those a command line leaves out
    assert model_defaults_for("toy", small(), set()).dropout == 0.2
    assert model_defaults_for("toy", small(), {"dropout"}).dropout == 0.0
    assert train_defaults_for("toy", TrainConfig(), set()).lr == 1e-3
    # and a+b with it: each part its own options, the model what both need
    both = build_objective("clm+toy", small(), None, section)
    assert both.parts["toy"].options == ToyOptions(toy_high=4) and both.backbone.cfg.n_segment == 4


def test_two_declarations_of_one_field_are_refused(registry):
    @dataclass
    class Rival(Options):
        mask_prob: float = option(0.5, "rival: another share of tokens to predict", within="(0, 1]")

    class Clash(Objective):
        name = "clash"
        Options = Rival

    before = dict(OBJECTIVES)
    with pytest.raises(ValueError, match=r"--mask_prob is declared both by MaskedLMOptions and by .*Rival: "
                                         r"declare it once"):
        register(Clash)
    assert OBJECTIVES == before and "clash" not in [f.name for f in dataclasses.fields(Config().obj)]

    # inheriting the declaration shares it: one flag, read by both
    @dataclass
    class Heir(MaskedLMOptions):
        heir_weight: float = option(1.0, "heir: a weight", at_least=0)

    class Shares(Objective):
        name = "shares"
        Options = Heir
    register(Shares)
    fields = [f.name for f in dataclasses.fields(Config().obj)]
    assert fields.count("mask_prob") == 1 and fields[-1] == "heir_weight"
    assert Shares.make_options(parse_overrides(["--mask_prob", "0.3"]).obj) == Heir(mask_prob=0.3)


def test_what_cannot_be_registered(registry):
    class Joined(Objective):
        name = "a+b"

    class BadDefault(Objective):
        name = "baddefault"
        defaults = {"learning_rate": 1e-3}

    class NotADataclass(Objective):
        name = "plainoptions"

        class Options:
            rate = 0.5

    with pytest.raises(ValueError, match="without '\\+'"):
        register(Joined)
    with pytest.raises(ValueError, match="defaults names --learning_rate, which is no ModelConfig or TrainConfig field"):
        register(BadDefault)
    with pytest.raises(ValueError, match="is not a dataclass"):
        register(NotADataclass)
    assert not {"a+b", "baddefault", "plainoptions"} & set(OBJECTIVES)


def test_options_annotated_with_types_rather_than_strings(registry):
    """A module without `from __future__ import annotations` declares its fields' types as types."""
    Counted = dataclasses.make_dataclass("Counted", [("counted_steps", int, option(2, "counted: steps", at_least=1))],
                                         bases=(Options,))
    register(type("CountedObjective", (Objective,), {"name": "counted", "Options": Counted}))
    assert parse_overrides(["--counted_steps", "3"]).obj.counted_steps == 3
    with pytest.raises(UserError, match=r"^--counted_steps expects an integer, got 'x'$"):
        parse_overrides(["--counted_steps", "x"])
    with pytest.raises(UserError, match=r"^--counted_steps must be >= 1, got 0$"):
        Counted(counted_steps=0).validate()
