"""Export a checkpoint's model as one .safetensors file: the weights and the config, nothing else.

    python -m minilm.safetensors_io out/ model.safetensors        # a run folder: its newest checkpoint
    import minilm; minilm.export("out/ckpt-00000600.pt", "model.safetensors")
    state_dict, metadata = load_safetensors("model.safetensors")

    python -m minilm.safetensors_io out/ exported/ --format hf    # a folder transformers loads
                                                                  # (minilm/hf_export.py)

An export replaces only an earlier export (or an empty file), never a checkpoint or another
file, and a crafted file is refused with a one-line error before any of its numbers is used.

A checkpoint also holds the optimizer's moments (twice the weights again), RNG states and the
data position: what resuming needs, not what using the model needs. The export keeps the
objective's state_dict (exactly as the checkpoint saved it: the names a fresh objective's
load_state_dict(strict=True) expects, the dtypes as trained) and enough to rebuild that objective.

The format (the safetensors layout, written here with the standard library and torch, so minilm
needs no new dependency; the `safetensors` package reads these files, and tests check that when
it is installed):

    8 bytes           N, the header's length, unsigned little-endian
    N bytes           a JSON object, UTF-8, padded with spaces to a multiple of 8:
                        {"__metadata__": {str: str},
                         name: {"dtype": "F32", "shape": [V, C], "data_offsets": [begin, end]}, ...}
    the data          every tensor's bytes, row-major, little-endian, back to back; offsets are
                      relative to the data's start. Tensors are laid out as the safetensors
                      package lays them: widest dtype first, then by name.

The metadata (safetensors allows only string values):

    format            "pt" (the safetensors convention for PyTorch weights)
    minilm_version    METADATA_VERSION, bumped if these keys ever change meaning
    objective         the objective's name, e.g. "mlm+sop"
    config            the checkpoint's config as JSON (model, data, obj, train sections): the saved
                      config is the model, so minilm.config.Config.from_dict(json.loads(...)) and
                      build_objective(objective, cfg.model, tokenizer, cfg.obj) rebuild it
    tokenizer         the sentencepiece model's bytes, base64: the file is self-contained
                      (absent for a checkpoint that carries no tokenizer)
    step              the training step the weights are from
    aliases           JSON {name: stored name}, only where tensors share one storage (t5's encoder
                      and decoder share the token embedding). safetensors refuses shared tensors, so
                      each is stored once, under its first name in sorted order; load_safetensors
                      puts the other names back, pointing at the same tensor, so tying survives.
"""
from __future__ import annotations

import base64
import json
import os
import struct
import sys

import torch

from minilm.errors import UserError

METADATA_VERSION = "1"

# torch dtype -> safetensors name. The order of SAFETENSORS_ORDER is the safetensors package's
# Dtype enum, whose order (descending) decides the layout of the data: widest first, so every
# tensor starts aligned to its element size.
DTYPE_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64",
    torch.uint64: "U64", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
}
SAFETENSORS_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
                     "F32", "C64", "F64", "I64", "U64"]
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
MAX_HEADER = 100 << 20   # the safetensors package's own limit on the header


# ----------------------------------------------------------------------------- writing
FORMATS = ("minilm", "hf")   # minilm's own .safetensors file; a Hugging Face transformers folder


def export(checkpoint: str, out_path: str, log=None, format: str = "minilm") -> str:
    """Write `checkpoint`'s weights and config to `out_path` (.safetensors); returns out_path.
    format "hf": `out_path` is a folder in Hugging Face transformers' layout instead
    (minilm/hf_export.py: config.json, model.safetensors under transformers' names, tokenizer).

    checkpoint: a checkpoint file, or a run folder (its newest checkpoint that loads; a damaged
    newer one is skipped with a note on `log`, stderr by default). One-line UserErrors for a
    missing or unloadable checkpoint and an unwritable `out_path`, and for an `out_path` whose
    replacing would destroy something (see check_output)."""
    from minilm.checkpoint import load_checkpoint_or_newest, tensor_to_bytes
    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "hf":
        from minilm.hf_export import export_folder
        return export_folder(checkpoint, out_path, log)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.exists(checkpoint):
        raise UserError(f"no checkpoint at {checkpoint}; pass a checkpoint file or a run folder (train one "
                        "first with train.py)")
    check_output(out_path, checkpoint)   # before loading: a refusal should not wait for a large file
    path, state = load_checkpoint_or_newest(checkpoint, log=log, flag="the export")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"{path} is not a minilm checkpoint (its model entry is not a state_dict)")
    metadata = {"format": "pt", "minilm_version": METADATA_VERSION,
                "objective": str(state.get("objective") or state["config"].get("train", {}).get("objective", "")),
                "config": json.dumps(state["config"], sort_keys=True),
                "step": str(int(state.get("step") or 0))}
    if state.get("tokenizer") is not None:
        metadata["tokenizer"] = base64.b64encode(tensor_to_bytes(state["tokenizer"])).decode("ascii")
    save_safetensors(weights, out_path, metadata)
    return out_path


def check_output(out_path: str, source: str | None = None) -> None:
    """A one-line UserError unless writing `out_path` destroys nothing: it must be a new file, an
    empty one, or a safetensors file (an earlier export, which it replaces). So never the
    `source` checkpoint, nor any other checkpoint, the run's metrics or a file of the user's;
    never a device, FIFO or socket; and not a new file named like a checkpoint, which --resume
    and sample.py would then try to load from the run folder."""
    from minilm.checkpoint import is_checkpoint_name, not_a_regular_file
    from minilm.trainer import BEST_NAME
    if os.path.isdir(out_path):
        raise UserError(f"{out_path} is a folder; name the file to write, e.g. {os.path.join(out_path, 'model.safetensors')}")
    instead = "choose another output path, e.g. model.safetensors"
    if source is not None and os.path.isfile(out_path) and os.path.samefile(out_path, source):
        raise UserError(f"{out_path} is the checkpoint being exported; writing it would destroy it: {instead}")
    name = os.path.basename(out_path)
    if is_checkpoint_name(name) or name == BEST_NAME:
        raise UserError(f"{out_path} is named like a checkpoint, which --resume and sample.py would try to load; "
                        f"{instead}")
    odd = not_a_regular_file(out_path)
    if odd is not None:
        raise UserError(f"will not write {out_path}: it is {odd}, not a regular file; {instead}")
    if os.path.exists(out_path) and os.path.getsize(out_path) > 0 and not is_safetensors_file(out_path):
        raise UserError(f"{out_path} already exists and is not a safetensors file (an export replaces only an "
                        f"earlier export); {instead}, or delete it yourself first")


def is_safetensors_file(path: str) -> bool:
    """Whether the regular file at `path` starts with a well-formed safetensors header (False for
    one that cannot be read: nothing replaces a file minilm could not look at)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            head += f.read(min(struct.unpack("<Q", head)[0], MAX_HEADER))
        parse_header(head, path)
    except (OSError, UserError):
        return False
    return True


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """`tensors` as a .safetensors file, written atomically (a temporary file, then a rename).
    Tensors that share storage are stored once and named in metadata["aliases"] (see the top).
    Replaces only an earlier safetensors file (check_output)."""
    from minilm.checkpoint import atomic_write
    stored, aliases = split_aliases(tensors)
    metadata = dict(metadata or {})
    if aliases:   # only then: a file without shared tensors is exactly what safetensors would write
        metadata["aliases"] = json.dumps(aliases, sort_keys=True)
    header, order = build_header(stored, metadata)
    check_output(path)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(header)) + header)
        for name in order:
            f.write(little_endian_bytes(stored[name]))

    try:
        atomic_write(path, write)
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror or err}") from None


def split_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor} with each shared tensor once, {alias: stored name}).

    Two names are one tensor when they are the same view of the same storage (same start, shape,
    strides and dtype, and neither a lazily conjugated or negated view of the other): a tied
    weight. Tensors that overlap only in part (a slice of another) are stored as copies of their
    own: correct values, without the sharing."""
    stored, aliases, seen = {}, {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}, not a tensor")
        if t.dtype not in DTYPE_NAMES:
            raise UserError(f"{name} has dtype {t.dtype}, which safetensors cannot store")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
               t.device, t.is_conj(), t.is_neg()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            stored[name] = t
            if key is not None:
                seen[key] = name
    return stored, aliases


def build_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """(the padded JSON header, the names in data order). Compact JSON, UTF-8, padded with spaces
    to a multiple of 8 so the data starts aligned: byte for byte what the safetensors package
    writes (up to the order of the metadata keys, which it keeps in a hash map)."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata maps strings to strings")
    rank = {name: i for i, name in enumerate(SAFETENSORS_ORDER)}
    order = sorted(tensors, key=lambda n: (-rank[DTYPE_NAMES[tensors[n].dtype]], n))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8), order


def little_endian_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements, row-major, as little-endian bytes (any dtype: bf16 has no numpy
    type, so the bytes come from a uint8 view of a contiguous CPU copy)."""
    flat = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        raw = raw.reshape(-1, t.element_size()).flip(-1).reshape(-1)
    return raw.numpy().tobytes()


# ----------------------------------------------------------------------------- reading
def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of a .safetensors file, with metadata["aliases"] (if any) put back:
    an alias is the very tensor of the name it points to. One-line UserErrors for a missing file
    and for one that is not a well-formed safetensors file (every header field is checked before
    it is used: a crafted header is refused, never a traceback)."""
    from minilm.checkpoint import not_a_regular_file
    if not os.path.exists(path):
        raise UserError(f"no file at {path}; export one with python -m minilm.safetensors_io CKPT {path}")
    odd = not_a_regular_file(path)
    if odd is not None:
        raise UserError(f"{path} is {odd}, not a safetensors file; pass the path of an exported .safetensors file")
    with open(path, "rb") as f:
        data = f.read()
    header, body = parse_header(data, path)
    metadata = read_metadata(header.pop("__metadata__", None) or {}, path)
    entries = {name: header_entry(name, info, path) for name, info in header.items()}
    check_layout(entries, len(body), path)
    tensors = {name: tensor_from_bytes(dtype, shape, body[begin:end])
               for name, (dtype, shape, begin, end) in entries.items()}
    for alias, target in read_aliases(metadata, tensors, path).items():
        tensors[alias] = tensors[target]
    return tensors, metadata


def parse_header(data: bytes, path: str) -> tuple[dict, memoryview]:
    """(the header as a dict, the data after it)."""
    bad = f"{path} is not a safetensors file"
    if len(data) < 8:
        raise UserError(f"{bad}: it is {len(data)} bytes long")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(MAX_HEADER, len(data) - 8):
        raise UserError(f"{bad}: its header claims {length} bytes")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):   # ValueError: also a 5000-digit number
        raise UserError(f"{bad}: its header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise UserError(f"{bad}: its header is not a JSON object of tensors")
    return header, memoryview(data)[8 + length:]


def read_metadata(metadata: dict, path: str) -> dict[str, str]:
    """The header's __metadata__, which the format allows only string values in."""
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise UserError(f"{path} is not a valid safetensors file: its metadata's {key!r} is a "
                            f"{type(value).__name__}, not a string")
    return metadata


def is_count(value) -> bool:
    """A JSON non-negative integer (not a bool, float or string that looks like one)."""
    return type(value) is int and value >= 0


def header_entry(name: str, info, path: str) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked: a known dtype name, a shape
    of non-negative integers that torch can index, and two non-negative integer offsets whose
    span is exactly shape x element size bytes."""
    bad = f"{path} is not a valid safetensors file: tensor {name!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise UserError(f"{bad} has a malformed header entry ({str(info)[:80]}); it needs dtype, shape "
                        "and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"{bad} has dtype {str(dtype)[:40]!r}, not one of {', '.join(SAFETENSORS_ORDER)}")
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        raise UserError(f"{bad} has shape {str(shape)[:80]}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(n) for n in offsets):
        raise UserError(f"{bad} has data_offsets {str(offsets)[:80]}, not two non-negative integers")
    extent = 1   # torch computes strides over every dimension, a zero-length one counted as 1
    for n in shape:
        extent *= max(n, 1)
    if extent >= 2 ** 63:
        raise UserError(f"{bad} has shape {str(shape)[:80]}, too large for any tensor")
    begin, end = offsets
    size = extent * DTYPES[dtype].itemsize if 0 not in shape else 0
    if begin > end or end - begin != size:
        raise UserError(f"{bad} ({dtype} {shape}) needs {size} bytes but its offsets {begin}..{end} hold "
                        f"{end - begin}")
    return DTYPES[dtype], shape, begin, end


def check_layout(entries: dict[str, tuple], n_bytes: int, path: str) -> None:
    """The data is the tensors back to back, in offset order: no tensor past the end, no
    overlap, no gap, no tail."""
    bad = f"{path} is not a valid safetensors file"
    covered, previous = 0, None
    for name, (_, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if end > n_bytes:
            raise UserError(f"{bad}: tensor {name!r} ({shape}) needs bytes {begin}..{end} but the file holds "
                            f"{n_bytes} data bytes (it is cut short?)")
        if begin < covered:
            raise UserError(f"{bad}: the data of tensors {previous!r} and {name!r} overlap")
        if begin > covered:
            raise UserError(f"{bad}: {begin - covered} bytes before tensor {name!r} belong to no tensor")
        covered, previous = end, name
    if covered != n_bytes:
        raise UserError(f"{bad}: {n_bytes - covered} bytes past its last tensor")


def read_aliases(metadata: dict[str, str], stored: dict[str, torch.Tensor], path: str) -> dict[str, str]:
    """metadata["aliases"]: {alias: stored name}, checked; an alias may name neither a stored
    tensor (it would silently replace it) nor another alias."""
    bad = f"{path} is not a valid safetensors file: its metadata's aliases"
    try:
        aliases = json.loads(metadata.get("aliases", "{}"))
    except (ValueError, RecursionError):
        raise UserError(f"{bad} are not JSON") from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise UserError(f"{bad} are not a JSON object of names ({metadata['aliases'][:80]})")
    for alias, target in aliases.items():
        if alias in stored:
            raise UserError(f"{bad} name {alias!r}, which is also a stored tensor")
        if target not in stored:
            raise UserError(f"{bad} point {alias!r} to {target!r}, which the file does not hold")
    return aliases


def tensor_from_bytes(dtype: torch.dtype, shape: list[int], raw: memoryview) -> torch.Tensor:
    """A tensor from its little-endian bytes (checked by header_entry to be exactly its size)."""
    if len(raw) == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if sys.byteorder == "big" and dtype.itemsize > 1:
        flat = flat.reshape(-1, dtype.itemsize).flip(-1).reshape(-1).contiguous()
    return flat.view(dtype).reshape(shape)


# ----------------------------------------------------------------------------- command line
USAGE = ("usage: python -m minilm.safetensors_io CHECKPOINT_OR_RUN_FOLDER OUT.safetensors\n"
         "       python -m minilm.safetensors_io CHECKPOINT_OR_RUN_FOLDER OUT_FOLDER --format hf")


def main(argv: list[str]) -> None:
    argv, format = list(argv), "minilm"
    for i, arg in enumerate(argv):   # --format NAME or --format=NAME, anywhere
        if arg == "--format" or arg.startswith("--format="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in FORMATS:
                raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {value!r}")
            format = value
            del argv[i:i + (1 if "=" in arg else 2)]
            break
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        if argv in (["-h"], ["--help"]):
            print(USAGE + "\n\nWrites the model's weights and config (no optimizer state) as one .safetensors "
                  "file; see minilm/safetensors_io.py for the metadata it carries. --format hf writes a folder "
                  "that Hugging Face transformers loads (minilm/hf_export.py).")
            return
        raise UserError(f"expected a checkpoint (or run folder) and an output file; {USAGE}")
    out = export(argv[0], argv[1], format=format)
    if format == "hf":
        size = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
        print(f"wrote {out}/ ({size / 2**20:.1f} MiB)")
    else:
        print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
