"""minilm: a readable from-scratch PyTorch library for pretraining Transformer language models.

    import minilm
    minilm.export("out", "model.safetensors")    # a run's newest checkpoint -> weights + config

`import minilm` itself is light: the names below are imported on first use (PEP 562's module
__getattr__), so `import minilm.config` still pulls in no torch. Submodules import as before
(`import minilm.model`, `from minilm.objectives import build_objective`).
"""
from __future__ import annotations

import importlib

# public name -> the module that provides it. minilm.export is that module itself: it is callable
# (see the end of minilm/export.py), so `minilm.export(ckpt, path)` works whichever was imported first.
_LAZY = {"export": "minilm.export"}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'minilm' has no attribute {name!r}")
