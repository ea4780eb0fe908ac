"""minilm: a readable from-scratch PyTorch library for pretraining Transformer language models.

    import minilm
    m = minilm.load("out")                       # a run's newest checkpoint, ready for inference
    m.generate("Once upon a time")               # fill, infill, score, embed: see minilm/api.py
    minilm.export("out", "model.safetensors")    # a run's newest checkpoint -> weights + config
    minilm.export("out", "hf_folder", format="hf")   # ... -> a folder Hugging Face transformers loads
    minilm.explain("mlm", "Any sentence.")       # what an objective does to it: minilm/explain.py

`import minilm` itself is light: what load and export need is imported when it is called, so
`import minilm.config` still pulls in no torch. Submodules import as before (`import
minilm.model`, `from minilm.objectives import build_objective`).
"""
from __future__ import annotations

import os


def load(path: str, device="auto"):
    """A checkpoint file or run folder (its newest checkpoint that loads) -> a minilm.api.Model
    with generate, fill, infill, score and embed, each where the checkpoint's objective supports
    it. device: "auto" (cuda, then mps, then cpu), a name, or a torch.device."""
    from minilm.api import load as load_model
    return load_model(path, device)


def export(checkpoint: str, out_path: str, log=None, format: str = "minilm") -> str:
    """A checkpoint file or run folder (its newest checkpoint) -> out_path, a .safetensors file
    with the model's weights and its config, tokenizer and objective in the metadata
    (minilm/safetensors_io.py). format="hf": out_path is a folder that Hugging Face transformers'
    AutoModelFor*.from_pretrained loads (minilm/hf_export.py). Returns out_path."""
    from minilm.api import check_path
    from minilm.safetensors_io import export as export_file
    check_path("checkpoint", checkpoint)
    check_path("out_path", out_path, "the folder to write" if format == "hf" else "the .safetensors file to write")
    if log is not None and not callable(log):
        from minilm.errors import UserError
        raise UserError(f"log must be None or a function taking a str (print, say), got {log!r}")
    return export_file(os.fspath(checkpoint), os.fspath(out_path), log, format=format)


def explain(objective: str | None, text: str, **kwargs):
    """What objective `objective` does to `text`: its training batch for that sentence, position by
    position, and every attention mask its model receives (a minilm.explain.Explanation: .columns,
    .decoder, .masks, .notes, .table(), .save_png(path)). Keywords: ckpt, tokenizer, seed, options,
    seq_len, text_pair (minilm/explain.py)."""
    from minilm.explain import explain as explain_text
    return explain_text(objective, text, **kwargs)


__all__ = ["explain", "export", "load"]
