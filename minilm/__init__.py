"""minilm: a readable from-scratch PyTorch library for pretraining Transformer language models.

    import minilm
    minilm.export("out", "model.safetensors")    # a run's newest checkpoint -> weights + config

`import minilm` itself is light: what export needs is imported when it is called, so
`import minilm.config` still pulls in no torch. Submodules import as before (`import
minilm.model`, `from minilm.objectives import build_objective`).
"""
from __future__ import annotations


def export(checkpoint: str, out_path: str, log=None) -> str:
    """A checkpoint file or run folder (its newest checkpoint) -> out_path, a .safetensors file
    with the model's weights and its config, tokenizer and objective in the metadata
    (minilm/safetensors_io.py). Returns out_path."""
    from minilm.safetensors_io import export as export_file
    return export_file(checkpoint, out_path, log)


__all__ = ["export"]
