"""Objectives by name. Adding one: write minilm/objectives/NAME.py with a subclass of
`Objective` (see base.py for the contract), then add it to OBJECTIVES below."""
from __future__ import annotations

import difflib

from minilm.errors import UserError
from minilm.objectives.base import IGNORE, Objective, finalize
from minilm.objectives.clm import CausalLM

OBJECTIVES: dict[str, type[Objective]] = {
    CausalLM.name: CausalLM,
}


def build_objective(name: str, model_cfg, tokenizer=None, options=None) -> Objective:
    """`options` is the run's ObjectiveConfig (defaults when None)."""
    if options is None:
        from minilm.config import ObjectiveConfig
        options = ObjectiveConfig()
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown --objective {name!r}{hint} (available: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name](model_cfg, tokenizer, options)


__all__ = ["IGNORE", "OBJECTIVES", "Objective", "build_objective", "finalize"]
