"""The tokenizer of a public model (RoBERTa, GPT-2, a Llama), used by minilm as its own.

A public checkpoint comes with its tokenizer's files: vocab.json + merges.txt for GPT-2's and
RoBERTa's byte-level BPE (encoded here by minilm/bpe.py, our own code), or a sentencepiece
tokenizer.model (Llama's; sentencepiece applies the model's own normalization), and
tokenizer_config.json / special_tokens_map.json saying which pieces are <pad>, <s>, <mask>...

minilm's objectives refer to special tokens by fixed ids (tokenizer.py: PAD 0, UNK 1, BOS 2, EOS 3,
MASK 4, CLS 5, SEP 6, sentinels and language tags up to NUM_SPECIAL), so a ForeignTokenizer
REORDERS ids instead of teaching every objective new ones:
    minilm id i  <-  foreign id foreign_ids[i]
  * ids 0 .. NUM_SPECIAL-1: the foreign specials at minilm's slots. RoBERTa: <pad> 0, <unk> 1,
    <s> 2 (bos) and 5 (cls), </s> 3 (eos) and 6 (sep), <mask> 4. A slot the foreign vocabulary
    has no piece for (the sentinels, language tags, GPT-2's <pad> and <mask>, BERT's bos) gets a
    new row: foreign_ids[i] == -1, an embedding the import initializes fresh.
  * ids NUM_SPECIAL ..: every other foreign id, in foreign order. (RoBERTa's "the", foreign
    id 5, becomes NUM_SPECIAL + 1, after "." at NUM_SPECIAL.)
Importing weights permutes embedding rows the same way (`new_rows = old_rows[foreign_ids]`);
exporting gives a foreign id the row of the first minilm id mapped to it.

As with minilm's own tokenizer, specials are inserted by id only: text that spells "<mask>" or
"</s>" is ordinary text and encodes to ordinary pieces (Hugging Face's tokenizers match such
spellings; that is the one place where ids differ from theirs, see tests/test_hf_tokenizer.py).

In a checkpoint, a token folder's fingerprint and out_dir/tokenizer.model, the tokenizer is one
byte string: a header line and a JSON object holding the original files
(`tokenizer.tokenizer_from_bytes` and `Tokenizer.load` tell it from a sentencepiece model).
`write_hf_tokenizer` writes files that transformers loads for either kind of tokenizer.
"""
from __future__ import annotations

import base64
import json
import os

import torch

from minilm.bpe import ByteLevelBPE, unicode_to_bytes
from minilm.errors import UserError
from minilm.tokenizer import (BOS_ID, CLS_ID, EOS_ID, LANG_IDS, MASK_ID, NUM_SPECIAL, PAD_ID, RESERVED_PIECES,
                              SENTINEL_IDS, SEP_ID, UNK_ID, WORD_MARK, text_facts, word_starts_from_tables)

HEADER = b"minilm foreign tokenizer 1\n"
# the files a tokenizer folder may hold that we keep: what defines the ids, and what says which are special
KEPT_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json")
BINARY_FILES = ("tokenizer.model",)
# minilm's special slots and the tokenizer_config.json key that names the foreign piece for each
SLOT_KEYS = {PAD_ID: "pad_token", UNK_ID: "unk_token", BOS_ID: "bos_token", EOS_ID: "eos_token",
             MASK_ID: "mask_token", CLS_ID: "cls_token", SEP_ID: "sep_token"}
# the names of minilm's specials (for a slot the foreign vocabulary has no piece for)
MINILM_NAMES = ["<pad>", "<unk>", "<s>", "</s>"] + RESERVED_PIECES   # as minilm's sentencepiece models spell them
# a folder that names none of its specials: the spellings RoBERTa's and GPT-2's vocab.json use
GUESSED_NAMES = {"pad_token": ("<pad>",), "unk_token": ("<unk>", "<|endoftext|>"),
                 "bos_token": ("<s>", "<|endoftext|>"), "eos_token": ("</s>", "<|endoftext|>"),
                 "mask_token": ("<mask>",), "cls_token": ("<s>",), "sep_token": ("</s>",)}


class ForeignTokenizer:
    """tokenizer.Tokenizer's interface over a public model's tokenizer files, in minilm's id order."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    mask_id, cls_id, sep_id = MASK_ID, CLS_ID, SEP_ID
    sentinel_ids, lang_ids = SENTINEL_IDS, LANG_IDS
    escapes_reserved_text = False   # text never becomes a special id (module docstring)

    def __init__(self, files: dict[str, bytes], foreign_vocab_size: int | None = None):
        """files: name -> contents, for the names in KEPT_FILES that the folder has.
        foreign_vocab_size: the foreign id space when a model's embedding table has more rows
        than its tokenizer has pieces (the rows past the pieces become ordinary ids no text makes)."""
        self.files = {name: bytes(data) for name, data in files.items() if name in KEPT_FILES}
        self.given_vocab_size = foreign_vocab_size
        self.model_bytes = self._serialize()
        config = {**_json_file(self.files, "special_tokens_map.json"),
                  **_json_file(self.files, "tokenizer_config.json")}
        added = _added_tokens(self.files, config)          # foreign id -> (content, special)
        if "vocab.json" in self.files and "merges.txt" in self.files:
            self.kind = "bpe"
            pieces, special = self._read_bpe(added)
        elif "tokenizer.model" in self.files:
            self.kind = "sentencepiece"
            pieces, special = self._read_sentencepiece(added)
        else:
            raise UserError(_why_no_tokenizer(self.files))
        size = max([len(pieces), foreign_vocab_size or 0] + [f + 1 for f in pieces])
        self.pieces = [pieces.get(f, "") for f in range(size)]   # a hole in the ids: no piece, never made
        special |= {f for f in range(size) if f not in pieces}
        self.foreign_vocab_size = size
        slots = self._slots(config, {piece: f for f, piece in sorted(pieces.items(), reverse=True)})
        special |= {f for f in slots if f >= 0}
        used = set(slots)
        foreign_ids = slots + [f for f in range(size) if f not in used]
        self.foreign_ids = torch.tensor(foreign_ids, dtype=torch.long)
        self._foreign = foreign_ids   # the same as a list, for per-token Python loops
        self.vocab_size = len(foreign_ids)
        # foreign id -> the first minilm id mapped to it, what encode returns
        self.minilm_id = [-1] * size
        for i, f in enumerate(foreign_ids):
            if f >= 0 and self.minilm_id[f] < 0:
                self.minilm_id[f] = i
        self.foreign_special = special
        self._build_tables()

    # ------------------------------------------------------------------ reading the files
    def _read_bpe(self, added: dict[int, tuple[str, bool]]):
        try:
            vocab = json.loads(self.files["vocab.json"].decode("utf-8"))
            lines = self.files["merges.txt"].decode("utf-8").splitlines()
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"vocab.json or merges.txt is not readable ({err}); download the tokenizer again") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise UserError("vocab.json is not a table of pieces to ids; download the tokenizer again")
        # merges.txt: an optional "#version" line, then "left right" per line, best merge first
        merges = [tuple(line.split(" ")) for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise UserError("merges.txt has a line that is not two pieces separated by a space; download it again")
        missing = [c for c in unicode_to_bytes() if c not in vocab]
        if missing:
            raise UserError(f"vocab.json lacks the byte piece {missing[0]!r}: it is not a byte-level BPE "
                            "(GPT-2/RoBERTa); minilm reads those and sentencepiece tokenizer.model files")
        self.bpe = ByteLevelBPE(vocab, merges)
        pieces = {i: piece for piece, i in vocab.items()}
        for f, (content, _) in added.items():
            pieces.setdefault(f, content)
        # the bytes each ordinary id stands for (an added token not in vocab.json: its text)
        in_vocab = lambda f, piece: f in self.bpe.piece_of and set(piece) <= self.bpe.char_byte.keys()  # noqa: E731
        self.piece_bytes = {f: self.bpe.piece_bytes(f) if in_vocab(f, piece) else piece.encode("utf-8")
                            for f, piece in pieces.items()}
        return pieces, {f for f, (_, is_special) in added.items() if is_special}

    def _read_sentencepiece(self, added: dict[int, tuple[str, bool]]):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.files["tokenizer.model"])
        except Exception:
            raise UserError("tokenizer.model is not a sentencepiece model; download the tokenizer again") from None
        n = self.sp.get_piece_size()
        pieces = {i: self.sp.id_to_piece(i) for i in range(n)}
        special = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for f, (content, is_special) in added.items():
            if f >= n:   # tokens added past the model (added_tokens.json): no text makes them
                pieces[f] = content
                special.add(f)
        return pieces, special

    def _slots(self, config: dict, piece_id: dict[str, int]) -> list[int]:
        """foreign_ids[0 : NUM_SPECIAL]: the foreign id for each minilm special, -1 for a new row."""
        named = {key: _content(config.get(key)) for key in SLOT_KEYS.values()}
        if self.kind == "sentencepiece":   # the model itself knows its pad, unk, bos and eos
            for key, f in (("pad_token", self.sp.pad_id()), ("unk_token", self.sp.unk_id()),
                           ("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id())):
                if named[key] is None and f >= 0:
                    named[key] = self.sp.id_to_piece(f)
        elif not any(named.values()):      # bare vocab.json + merges.txt: RoBERTa's or GPT-2's spellings
            named = {key: next((n for n in names if n in piece_id), None) for key, names in GUESSED_NAMES.items()}
        slots = [-1] * NUM_SPECIAL
        for slot, key in SLOT_KEYS.items():
            if named[key] is not None and named[key] in piece_id:
                slots[slot] = piece_id[named[key]]
        return slots

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        foreign = [self.bpe.encode(t) for t in texts] if self.kind == "bpe" else self.sp.encode(texts)
        m = self.minilm_id
        return [([BOS_ID] if bos else []) + [m[f] for f in ids] + ([EOS_ID] if eos else []) for ids in foreign]

    def to_foreign(self, ids) -> list[int]:
        """minilm ids -> the foreign tokenizer's ids (a new row has none: -1)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self._foreign[int(i)] for i in ids]

    def _decode_foreign(self, foreign: list[int]) -> str:
        if self.kind == "bpe":   # pieces may cut a character's bytes in two: join bytes, then decode
            return b"".join(self.piece_bytes[f] for f in foreign).decode("utf-8", errors="replace")
        return self.sp.decode(foreign)

    def decode(self, ids, *, specials: bool = False) -> str:
        """The text of `ids`. Special ids print nothing, unless specials=True: then minilm's reserved
        ones (mask, cls, sep, sentinels, language tags) print their names; pad/bos/eos never do."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, run = [], []
        for i in (int(i) for i in ids):
            if not self._special[i]:
                run.append(self._foreign[i])
            elif specials and MASK_ID <= i < NUM_SPECIAL:
                out += [self._decode_foreign(run), self.id_to_piece(i)]
                run = []
        return "".join(out) + self._decode_foreign(run)

    def decode_batch(self, batch, *, specials: bool = False) -> list[str]:
        return [self.decode(ids, specials=specials) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        f = self._foreign[int(i)]
        return MINILM_NAMES[int(i)] if f < 0 else self.pieces[f]

    # ------------------------------------------------------------------ per-id tables
    def _build_tables(self) -> None:
        """The same tables as Tokenizer._build_tables, from the foreign pieces' bytes and text."""
        rows = []   # per minilm id: (special, starts_word, breaks_line, n_bytes, newlines, *text_facts)
        for i, f in enumerate(self._foreign):
            if i < NUM_SPECIAL or f < 0 or f in self.foreign_special:
                rows.append((True, True, False, 0, 0, False, False, False, False, False))
                continue
            if self.kind == "bpe":
                data = self.piece_bytes[f]
            elif self.sp.is_byte(f):
                data = bytes([int(self.pieces[f][3:5], 16)])
            else:
                data = self.pieces[f].replace(WORD_MARK, " ").encode("utf-8")
            # a piece may hold part of a character: what it says is what decodes whole
            text = data.decode("utf-8", errors="ignore")
            facts = text_facts(text) if text else (False,) * 5
            # newlines counted, not flagged: byte-level BPE has "\n\n" pieces (a blank line in one id)
            rows.append((False, data[:1] == b" ", data[-1:] in (b"\n", b"\t", b"\r"), len(data), data.count(b"\n"),
                         *facts))
        columns = list(zip(*rows))
        self.special_table, self.starts_word_table, self.breaks_line_table = (
            torch.tensor(c, dtype=torch.bool) for c in columns[:3])
        self.bytes_per_token, self.newline_table = (torch.tensor(c, dtype=torch.long) for c in columns[3:5])
        self.whitespace_table, self.starts_lower_table, self.ends_stop_table, self.ends_cjk_stop_table, \
            self.closer_table = (torch.tensor(c, dtype=torch.bool) for c in columns[5:])
        self._special = columns[0]

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        return word_starts_from_tables(ids, self.starts_word_table.to(ids.device),
                                       self.breaks_line_table.to(ids.device))

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return self.special_table.to(ids.device)[ids]

    # ------------------------------------------------------------------ save / load
    def _serialize(self) -> bytes:
        files = {name: (base64.b64encode(data).decode("ascii") if name in BINARY_FILES else data.decode("utf-8"))
                 for name, data in sorted(self.files.items())}
        body = {"files": files, "foreign_vocab_size": self.given_vocab_size}
        return HEADER + json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")

    @staticmethod
    def is_serialized(data: bytes) -> bool:
        return bytes(data[:len(HEADER)]) == HEADER

    @classmethod
    def from_bytes(cls, data: bytes) -> "ForeignTokenizer":
        try:
            body = json.loads(bytes(data[len(HEADER):]).decode("utf-8"))
            files = {name: (base64.b64decode(text) if name in BINARY_FILES else text.encode("utf-8"))
                     for name, text in body["files"].items()}
            size = body.get("foreign_vocab_size")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError("the tokenizer data is damaged (a foreign tokenizer whose files do not read back); "
                            "import the model again with --init_from its folder") from None
        return cls(files, size)

    def save(self, path: str) -> None:
        from minilm.checkpoint import atomic_write_bytes
        atomic_write_bytes(path, self.model_bytes)

    @classmethod
    def load(cls, path: str):
        from minilm.tokenizer import Tokenizer
        return Tokenizer.load(path)

    def sentencepiece_settings(self) -> dict:
        """What the sentencepiece model's own settings say (`read_sentencepiece_settings`), and
        whether sentencepiece_bpe_json reproduces it: a BPE model, identity normalization, whitespace kept."""
        spec = read_sentencepiece_settings(self.files["tokenizer.model"])
        spec["writable"] = (spec["model_type"] == 2 and spec["normalizer"] == "identity"
                            and not spec["remove_extra_whitespaces"] and spec["escape_whitespaces"])
        return spec

    def write_files(self, folder: str) -> list[str]:
        """The original files, as the folder they came from had them; their paths."""
        from minilm.checkpoint import atomic_write_bytes
        os.makedirs(folder, exist_ok=True)
        paths = []
        for name, data in sorted(self.files.items()):
            paths.append(os.path.join(folder, name))
            atomic_write_bytes(paths[-1], data)
        return paths


def load_foreign_tokenizer(folder: str, vocab_size: int | None = None) -> ForeignTokenizer:
    """The tokenizer in a downloaded model's folder (module docstring). vocab_size: the model's
    embedding rows, when its config says more than the tokenizer has pieces."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; give the folder of a downloaded model (config.json, weights "
                        "and tokenizer files)")
    files = {}
    for name in KEPT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    files[name] = f.read()
            except OSError as err:
                raise UserError(f"cannot read {path}: {err.strerror}") from None
    if not (("vocab.json" in files and "merges.txt" in files) or "tokenizer.model" in files):
        raise UserError(f"{folder}: {_why_no_tokenizer(files, os.listdir(folder))}")
    return ForeignTokenizer(files, vocab_size)


def _why_no_tokenizer(files: dict, listing: list[str] = ()) -> str:
    if "vocab.txt" in listing:
        return ("it holds a WordPiece vocab.txt (BERT's tokenizer), which minilm does not read; minilm reads "
                "byte-level BPE (vocab.json + merges.txt) and sentencepiece (tokenizer.model) tokenizers")
    if "tokenizer.json" in files:
        return ("it has only tokenizer.json; minilm reads vocab.json + merges.txt (GPT-2, RoBERTa) or a sentencepiece "
                "tokenizer.model: download those files of the model too")
    return "no tokenizer files (vocab.json + merges.txt, or tokenizer.model); download the model's tokenizer too"


def _json_file(files: dict, name: str) -> dict:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{name} is not valid JSON ({err}); download the tokenizer again") from None
    return value if isinstance(value, dict) else {}


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: "<mask>" or {"content": "<mask>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(files: dict, config: dict) -> dict[int, tuple[str, bool]]:
    """foreign id -> (text, special?) for the tokens added on top of the model's vocabulary, from
    whichever of tokenizer.json, tokenizer_config.json and added_tokens.json say so."""
    added = {}
    for token in _json_file(files, "tokenizer.json").get("added_tokens") or []:
        if isinstance(token, dict) and isinstance(token.get("id"), int) and isinstance(token.get("content"), str):
            added[token["id"]] = (token["content"], bool(token.get("special", True)))
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        if str(key).isdigit() and isinstance(token, dict) and isinstance(token.get("content"), str):
            added[int(key)] = (token["content"], bool(token.get("special", True)))
    for content, f in _json_file(files, "added_tokens.json").items():
        if isinstance(f, int):
            added.setdefault(f, (content, True))
    return added


# ----------------------------------------------------------------------------- the way out
def write_hf_tokenizer(tokenizer, folder: str) -> list[str]:
    """Files in `folder` that transformers' AutoTokenizer.from_pretrained(folder) loads, encoding
    every text to tokenizer.encode's ids (add_special_tokens changes nothing: minilm frames rows
    itself); the paths written.

    A ForeignTokenizer writes its original files: their ids are the foreign ones
    (`to_foreign`), and Hugging Face's tokenizer, as its users expect, reads "<mask>" typed in a
    text as the mask token, which minilm's encode never does. A sentencepiece BPE model that came
    without a tokenizer.json gets one (transformers would need protobuf to convert it), and its
    tokenizer_config.json then names the plain PreTrainedTokenizerFast class.

    minilm's own tokenizer gets a tokenizer.json written here (`sentencepiece_bpe_json`): handing
    transformers the sentencepiece model does not work. Its LlamaTokenizer assumes Llama's ids
    (<unk> 0, <s> 1, </s> 2), puts a "▁" before every text and a <s> in front; and in
    transformers 5 LlamaTokenizer(vocab_file="tokenizer.model") ignores the file altogether,
    building a vocabulary of those three pieces with no byte pieces, so every character is
    unknown and dropped: an empty encoding. tokenizer_config.json asks for split_special_tokens,
    so "<mask>" in a text is text there too (`tok(text, split_special_tokens=False)` gives
    transformers' fill-mask pipeline its mask)."""
    from minilm.checkpoint import atomic_write_bytes
    if isinstance(tokenizer, ForeignTokenizer):
        paths = tokenizer.write_files(folder)
        spec = tokenizer.sentencepiece_settings() if tokenizer.kind == "sentencepiece" else None
        if spec is None or "tokenizer.json" in tokenizer.files or not spec["writable"]:
            return paths
        # transformers' LlamaTokenizer would rebuild the pipeline its own way (no "▁" before a text
        # that starts with a space, unlike sentencepiece): the config names the plain class instead
        names = {key: tokenizer.pieces[int(tokenizer.foreign_ids[slot])] for slot, key in SLOT_KEYS.items()
                 if tokenizer.foreign_ids[slot] >= 0}
        config = {**names, **_json_file(tokenizer.files, "tokenizer_config.json"),
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        written = {"tokenizer.json": sentencepiece_bpe_json(tokenizer.sp, dummy_prefix=spec["add_dummy_prefix"]),
                   "tokenizer_config.json": config}
        paths = [p for p in paths if os.path.basename(p) not in written]
    else:
        names = {key: tokenizer.id_to_piece(slot) for slot, key in SLOT_KEYS.items()}
        written = {"tokenizer.json": sentencepiece_bpe_json(tokenizer.sp),
                   "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **names,
                                             "split_special_tokens": True,   # specials by id only, as in minilm
                                             "clean_up_tokenization_spaces": False,   # decode gives the text back
                                             "add_bos_token": False, "add_eos_token": False}}
        paths = []
    os.makedirs(folder, exist_ok=True)
    for name, value in written.items():
        paths.append(os.path.join(folder, name))
        atomic_write_bytes(paths[-1], json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8"))
    return paths


def sentencepiece_bpe_json(sp, dummy_prefix: bool | None = None) -> dict:
    """A Hugging Face tokenizer.json that encodes as minilm's sentencepiece BPE model does
    (dummy_prefix None), or as a foreign one with identity normalization does (dummy_prefix: whether
    it puts a "▁" before every text): then "▁" stays in the pieces and a normalizer writes spaces
    as "▁", as sentencepiece does, a literal "▁" included.

    sentencepiece's BPE starts from the text's characters (spaces written "▁") and repeatedly
    merges the adjacent pair whose concatenation is the piece of highest score; a character
    with no piece becomes its UTF-8 byte pieces <0xNN>. Hugging Face's BPE model does the same
    with a ranked list of merges and byte_fallback, so:
      * vocab: every piece at its id, with "▁" written as the space it stands for. No normalizer
        is then needed (minilm adds no dummy prefix and keeps whitespace as it is), and a "▁"
        typed in a text has no piece, so it falls back to its three bytes, as minilm's encode writes it.
      * merges: every split of each ordinary piece into two pieces, ranked by the merged piece's
        score (best first): whichever halves the text's characters reach, the pair merges at the
        piece's rank. No pre-tokenizer: sentencepiece merges across the whole text too (its pieces
        hold a space only at the start, or only spaces).
      * the special pieces are added tokens: never matched in text (split_special_tokens), never
        produced by merges, skipped by decode(skip_special_tokens=True).
    """
    V = sp.get_piece_size()
    own = dummy_prefix is None
    special = [sp.is_control(i) or sp.is_unknown(i) or (own and i < NUM_SPECIAL) for i in range(V)]
    keep = [special[i] or sp.is_byte(i) or not own for i in range(V)]   # pieces written as they are
    text_of = [sp.id_to_piece(i) if keep[i] else sp.id_to_piece(i).replace(WORD_MARK, " ") for i in range(V)]
    vocab = {text: i for i, text in enumerate(text_of)}
    ordinary = {text: i for i, text in enumerate(text_of) if not (special[i] or sp.is_byte(i))}
    merges = []
    for text, i in ordinary.items():
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in ordinary and right in ordinary:
                merges.append((-sp.get_score(i), i, ordinary[left], left, right))
    merges.sort()
    added = [{"id": i, "content": text_of[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in range(V) if special[i]]
    normalizer, decoders = None, [{"type": "ByteFallback"}, {"type": "Fuse"}]
    if not own:
        mark = [{"type": "Prepend", "prepend": WORD_MARK}] if dummy_prefix else []
        normalizer = {"type": "Sequence", "normalizers": mark + [{"type": "Replace", "pattern": {"String": " "},
                                                                  "content": WORD_MARK}]}
        decoders = ([{"type": "Replace", "pattern": {"String": WORD_MARK}, "content": " "}] + decoders
                    + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy_prefix else []))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": text_of[sp.unk_id()], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [[left, right] for *_, left, right in merges]},
    }


def read_sentencepiece_settings(model: bytes) -> dict:
    """A few fields of a sentencepiece model file, read from its protocol buffer by hand (the
    sentencepiece package reads them only with protobuf installed): ModelProto field 2 is the
    TrainerSpec (its field 3 the model type: 1 unigram, 2 BPE), field 3 the NormalizerSpec (1 the
    rule's name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces; booleans
    default to true, the model type to unigram)."""
    fields = _proto_fields(model)
    trainer, normalizer = _proto_fields(fields.get(2, b"")), _proto_fields(fields.get(3, b""))
    name = normalizer.get(1, b"nmt_nfkc")
    return {"model_type": trainer.get(3, 1), "normalizer": name.decode("utf-8", "replace"),
            "add_dummy_prefix": bool(normalizer.get(3, 1)), "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
            "escape_whitespaces": bool(normalizer.get(5, 1))}


def _proto_fields(data: bytes) -> dict[int, int | bytes]:
    """field number -> value (the last one of a repeated field) of one protocol buffer message:
    varints as ints, length-delimited fields as bytes, fixed-size ones skipped."""
    fields, i = {}, 0

    def varint():
        nonlocal i
        value, shift = 0, 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value
    try:
        while i < len(data):
            key = varint()
            number, wire = key >> 3, key & 7
            if wire == 0:
                fields[number] = varint()
            elif wire == 2:
                n = varint()
                fields[number], i = data[i:i + n], i + n
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            else:
                break
    except IndexError:
        pass   # a cut message: what was read so far (sentencepiece itself checked the file)
    return fields
