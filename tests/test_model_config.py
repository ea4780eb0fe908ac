"""The saved config is the model: objectives declare the model settings they need
(objectives/base.py, "Declared model settings"), model_config_for applies them once before the
model is built, and a model rebuilt from that config, saved as a plain dict, loads the weights
strictly, whatever the objective and whatever the order of the parts of "a+b"."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import minilm.objectives as objectives
from minilm.config import Config, ModelConfig, ObjectiveConfig
from minilm.errors import UserError
from minilm.model import EncoderDecoder, Transformer
from minilm.objectives import OBJECTIVES, build_objective
from minilm.objectives.base import Objective
from minilm.objectives.mlm import MaskedLM
from minilm.objectives.sop import SentenceOrder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

NAMES = list(OBJECTIVES) + ["mlm+sop", "sop+mlm", "clm+mlm", "wwm+sop"]


def options_for(name: str) -> ObjectiveConfig:
    """The objective options a build needs: classify's label names come from its data (train.py)."""
    return ObjectiveConfig(labels='["negative", "positive"]') if name == "classify" else ObjectiveConfig()


def small(**changes) -> ModelConfig:
    return ModelConfig(vocab_size=160, seq_len=16, n_layer=1, n_head=2, n_embd=16, **changes)


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_the_order_of_the_parts_does_not_change_the_backbone():
    """mlm+sop used to get the masked LM's embed_norm (the first part's backbone) and sop+mlm
    did not, while both saved embed_norm=False."""
    first, second = build_objective("mlm+sop", small()), build_objective("sop+mlm", small())
    assert shapes(first.backbone) == shapes(second.backbone)
    assert shapes(first.backbone)["embed_norm.weight"] == (16,)
    assert shapes(first.backbone)["seg_emb.weight"] == (2, 16)
    assert first.backbone.cfg == second.backbone.cfg
    # clm+mlm: the masked LM's encoder settings hold however the parts are ordered
    assert build_objective("clm+mlm", small()).backbone.cfg.embed_norm


@pytest.mark.parametrize("name", NAMES)
def test_the_saved_config_rebuilds_the_model_strictly(name):
    base = small()
    torch.manual_seed(0)
    built = build_objective(name, base, options=options_for(name))
    resolved = objectives.model_config_for(name, base)
    assert resolved == built.backbone.cfg                     # what is printed and saved is what was built
    assert base == small()                                    # the caller's config is left alone
    saved = Config(model=resolved).to_dict()                  # as a checkpoint stores it
    reloaded = Config.from_dict(saved).model
    assert reloaded == resolved
    # the config alone describes the backbone: a bare Transformer (t5: EncoderDecoder) takes its weights strictly
    backbone_state = {k[len("backbone."):]: v for k, v in built.state_dict().items() if k.startswith("backbone.")}
    backbone_class = EncoderDecoder if built.model_kind == "seq2seq" else Transformer
    backbone_class(reloaded).load_state_dict(backbone_state, strict=True)
    # and the whole objective rebuilt from it takes every weight strictly, heads included
    rebuilt = build_objective(name, reloaded, options=options_for(name))
    rebuilt.load_state_dict(built.state_dict(), strict=True)
    assert rebuilt.backbone.cfg == resolved


@pytest.mark.parametrize("name", NAMES)
def test_resolving_is_idempotent_so_old_checkpoints_rebuild(name):
    """A checkpoint saved before the settings were applied holds the unresolved config (for mlm:
    embed_norm False, n_segment 0); resolving it gives the model that was really trained."""
    old = Config.from_dict({"model": dataclasses.asdict(small())}).model
    once = objectives.model_config_for(name, old)
    assert objectives.model_config_for(name, once) == once
    flipped = "+".join(reversed(name.split("+")))
    assert objectives.model_config_for(flipped, old) == once


def test_declared_settings_and_data_minimums():
    resolve = objectives.model_config_for
    assert resolve("clm", small()) == small()
    assert resolve("mlm", small()) == small(embed_norm=True)
    assert resolve("sop", small()) == small(n_segment=2)
    assert resolve("sop", small(n_segment=3)) == small(n_segment=3)      # a minimum, not a value
    assert resolve("mlm+sop", small()) == small(embed_norm=True, n_segment=2)
    # what each declares in its configure: the masked LM an exact value, sop a minimum
    assert MaskedLM.configure(small(), MaskedLM.Options()) == small(embed_norm=True)
    assert SentenceOrder.configure(small(embed_norm=True), SentenceOrder.Options()) == small(embed_norm=True, n_segment=2)
    with pytest.raises(UserError, match="unknown --objective 'mlmx'"):
        resolve("mlmx", small())


def test_conflicting_parts_are_one_user_error(monkeypatch):
    class Plain(Objective):
        name = "plain"

        @classmethod
        def configure(cls, model_cfg, options):
            return dataclasses.replace(model_cfg, embed_norm=False)
    monkeypatch.setitem(OBJECTIVES, "plain", Plain)
    with pytest.raises(UserError, match=r"^mlm needs --embed_norm True but plain needs --embed_norm False; "
                                        r"these objectives cannot share one model$"):
        objectives.model_config_for("mlm+plain", small())

    class NoSegments(Objective):
        name = "nosegments"
        reads_padded_rows = True   # so that it may read sop's sentence pairs, and only the model conflicts

        @classmethod
        def configure(cls, model_cfg, options):
            return dataclasses.replace(model_cfg, n_segment=0)
    monkeypatch.setitem(OBJECTIVES, "nosegments", NoSegments)
    # sop reads sentence pairs, which need two segment embeddings or more
    with pytest.raises(UserError, match=r"^nosegments needs --n_segment 0 but sop needs --n_segment 2 or more; "
                                        r"these objectives cannot share one model$"):
        objectives.model_config_for("nosegments+sop", small())
    with pytest.raises(UserError, match=r"^sop needs --n_segment 2 or more but nosegments needs --n_segment 0; "):
        objectives.model_config_for("sop+nosegments", small())


def test_constructors_build_exactly_the_config_they_are_given():
    """No hidden change inside a constructor: a config that lacks a declared setting is refused
    (the model would not be the one the config describes), a resolved one is built as it is."""
    with pytest.raises(ValueError, match=r"mlm needs a model config with embed_norm=True; .*model_config_for"):
        MaskedLM(small())
    with pytest.raises(ValueError, match=r"sop needs a model config with n_segment>=2"):
        SentenceOrder(small())
    cfg = small(embed_norm=True)
    assert MaskedLM(cfg).backbone.cfg is cfg
