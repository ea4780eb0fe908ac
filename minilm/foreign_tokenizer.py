"""The tokenizer of a public model (RoBERTa, GPT-2, a Llama), used by minilm as its own.

A public checkpoint comes with its tokenizer's files: vocab.json + merges.txt for GPT-2's and
RoBERTa's byte-level BPE (encoded here by minilm/bpe.py, our own code), a sentencepiece
tokenizer.model (Llama's; sentencepiece applies the model's own normalization) or BERT's WordPiece
vocab.txt (minilm/wordpiece.py; lossy: decode gives words, not the text), and
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
Importing weights permutes embedding rows the same way (`new_rows = old_rows[foreign_ids]`, fresh
rows where -1); exporting takes them back with `foreign_rows = rows[export_ids]`: each foreign id
gets the row of a minilm id mapped to it, the one minilm's data trains where there are two
(RoBERTa's <s> from cls, not bos; </s> from eos, not sep).

As with minilm's own tokenizer, specials are inserted by id only: text that spells "<mask>" or
"</s>" is ordinary text and encodes to ordinary pieces (Hugging Face's tokenizers match the
spelling of every special or added token in a text: that is where ids differ from theirs, see
tests/test_hf_tokenizer.py).

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
KEPT_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
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
# which of two slots holding one foreign special gives its row back at export, best first (export_ids)
EXPORT_PREFERENCE = (EOS_ID, CLS_ID, SEP_ID, MASK_ID, BOS_ID, PAD_ID, UNK_ID)
# BERT's, which its tokenizer class knows without a file saying so
BERT_NAMES = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}


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
        # Hugging Face's tokenizer.json, when there is one, says exactly how text is cut: minilm
        # reads only what its own code reproduces, never a pipeline it would silently encode otherwise
        pipeline = _json_file(self.files, "tokenizer.json")
        model_type = (pipeline.get("model") or {}).get("type")
        if "tokenizer.model" in self.files:
            self.kind = "sentencepiece"
            pieces, special = self._read_sentencepiece(added)
        elif ("vocab.json" in self.files and "merges.txt" in self.files) or model_type == "BPE":
            self.kind = "bpe"
            _check_gpt2_pipeline(pipeline, config)
            pieces, special = self._read_bpe(added, pipeline.get("model"))
        elif "vocab.txt" in self.files or model_type == "WordPiece":
            self.kind = "wordpiece"
            pieces, special = self._read_wordpiece(added, config, pipeline)
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
        # foreign id -> the minilm id whose row an export should write back. A foreign special at
        # two slots (RoBERTa's <s> at bos and cls, </s> at eos and sep; GPT-2's <|endoftext|> at
        # unk, bos and eos) has two rows after import, and only the one minilm's data writes trains:
        # eos (between documents), cls, sep, mask; never bos or unk (the first one, bos, for <s>).
        export = list(self.minilm_id)
        for i in reversed(EXPORT_PREFERENCE):
            if foreign_ids[i] >= 0:
                export[foreign_ids[i]] = i
        self.export_ids = torch.tensor(export, dtype=torch.long)
        self.foreign_special = special
        self._build_tables()

    # ------------------------------------------------------------------ reading the files
    def _read_bpe(self, added: dict[int, tuple[str, bool]], model: dict | None):
        if "vocab.json" in self.files and "merges.txt" in self.files:
            try:
                vocab = json.loads(self.files["vocab.json"].decode("utf-8"))
                lines = self.files["merges.txt"].decode("utf-8").splitlines()
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise UserError(f"vocab.json or merges.txt is not readable ({err}); download the tokenizer "
                                "again") from None
            # merges.txt: an optional "#version" line, then "left right" per line, best merge first
            merges = [tuple(line.split(" ")) for line in lines if line.strip() and not line.startswith("#version")]
        else:   # tokenizer.json's model: the same vocab, merges as "left right" or [left, right]
            vocab, merges = model.get("vocab"), model.get("merges") or []
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise UserError("vocab.json is not a table of pieces to ids; download the tokenizer again")
        if any(len(m) != 2 for m in merges):
            raise UserError("merges.txt has a line that is not two pieces separated by a space; download it again")
        missing = [c for c in unicode_to_bytes() if c not in vocab]
        if missing:
            raise UserError(f"vocab.json lacks the byte piece {missing[0]!r}: it is not a byte-level BPE "
                            "(GPT-2/RoBERTa); minilm reads those, sentencepiece tokenizer.model files and BERT's "
                            "vocab.txt")
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

    def _read_wordpiece(self, added: dict[int, tuple[str, bool]], config: dict, pipeline: dict):
        from minilm.wordpiece import WordPiece
        if "vocab.txt" in self.files:
            try:
                lines = self.files["vocab.txt"].decode("utf-8").split("\n")
            except UnicodeDecodeError:
                raise UserError("vocab.txt is not UTF-8 text; download the tokenizer again") from None
            if lines and lines[-1] == "":
                lines.pop()   # the newline that ends the last piece
            pieces = dict(enumerate(line.rstrip("\r") for line in lines))
        else:
            pieces = {f: piece for piece, f in (pipeline["model"].get("vocab") or {}).items() if isinstance(f, int)}
        config = {**config, **_check_bert_pipeline(pipeline)}
        for f, (content, _) in added.items():
            pieces.setdefault(f, content)
        vocab = {piece: f for f, piece in sorted(pieces.items(), reverse=True)}
        unk = _content(config.get("unk_token")) or BERT_NAMES["unk_token"]
        if unk not in vocab:
            raise UserError(f"vocab.txt has no {unk} piece for unknown words; download the tokenizer again")
        self.wordpiece = WordPiece(vocab, vocab[unk], lowercase=bool(config.get("do_lower_case", True)),
                                   strip_accents=config.get("strip_accents"))
        return pieces, {f for f, (_, is_special) in added.items() if is_special}

    def _slots(self, config: dict, piece_id: dict[str, int]) -> list[int]:
        """foreign_ids[0 : NUM_SPECIAL]: the foreign id for each minilm special, -1 for a new row."""
        named = {key: _content(config.get(key)) for key in SLOT_KEYS.values()}
        if self.kind == "sentencepiece":   # the model itself knows its pad, unk, bos and eos
            for key, f in (("pad_token", self.sp.pad_id()), ("unk_token", self.sp.unk_id()),
                           ("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id())):
                if named[key] is None and f >= 0:
                    named[key] = self.sp.id_to_piece(f)
        elif self.kind == "wordpiece":     # BERT's names where the files name none
            named = {key: named[key] or BERT_NAMES.get(key) for key in named}
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
        if self.kind == "sentencepiece":
            foreign = self.sp.encode(texts)
        else:
            foreign = [(self.bpe if self.kind == "bpe" else self.wordpiece).encode(t) for t in texts]
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
        if self.kind == "wordpiece":   # the words, a space between them: "##" pieces continue a word
            return "".join(p[2:] if p.startswith("##") else (" " + p if k else p)
                           for k, p in enumerate(self.pieces[f] for f in foreign))
        return self.sp.decode(foreign)

    def decode(self, ids, *, specials: bool = False) -> str:
        """The text of `ids`. Special ids print nothing, unless specials=True: then minilm's reserved
        ones (mask, cls, sep, sentinels, language tags) print their names; pad/bos/eos never do.
        The unknown id, which a WordPiece or sentencepiece vocabulary gives for what it lacks, prints
        as the foreign tokenizer writes it ("[UNK]", " ⁇ ")."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, run = [], []
        for i in (int(i) for i in ids):
            if not self._special[i] or (i == UNK_ID and self._foreign[i] >= 0):   # what the vocabulary lacked
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
            elif self.kind == "wordpiece":   # a word's first piece stands for the space before it too
                piece = self.pieces[f]
                data = piece[2:].encode("utf-8") if piece.startswith("##") else b" " + piece.encode("utf-8")
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
        if self.kind == "wordpiece" and self.wordpiece.lowercase:   # no case left to tell a sentence start by
            self.starts_lower_table = torch.zeros_like(self.starts_lower_table)

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        return word_starts_from_tables(ids, self.starts_word_table.to(ids.device),
                                       self.breaks_line_table.to(ids.device))

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return self.special_table.to(ids.device)[ids]

    # ------------------------------------------------------------------ save / load
    def _serialize(self) -> bytes:
        files = {}
        for name, data in sorted(self.files.items()):
            try:
                files[name] = base64.b64encode(data).decode("ascii") if name in BINARY_FILES else data.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{name} is not UTF-8 text; download the tokenizer again") from None
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
    if not files.keys() & {"vocab.json", "tokenizer.model", "vocab.txt", "tokenizer.json"}:
        raise UserError(f"{folder}: {_why_no_tokenizer(files)}")
    try:
        return ForeignTokenizer(files, vocab_size)
    except UserError as err:
        raise UserError(f"{folder}: {err}") from None


def _check_gpt2_pipeline(pipeline: dict, config: dict) -> None:
    """A UserError unless tokenizer.json (if any) and tokenizer_config.json describe what
    minilm/bpe.py does: no normalizer, GPT-2's ByteLevel pre-tokenizer with its pattern and no
    added space, a plain BPE model."""
    pre, model = pipeline.get("pre_tokenizer"), pipeline.get("model") or {}
    differs = None
    if config.get("add_prefix_space"):
        differs = "puts a space before every text (add_prefix_space)"
    elif pipeline.get("normalizer") is not None:
        differs = f"normalizes text ({pipeline['normalizer'].get('type')})"
    elif pre is not None and (pre.get("type") != "ByteLevel" or pre.get("add_prefix_space")
                              or not pre.get("use_regex", True)):
        differs = f"cuts words with a {pre.get('type')} pre-tokenizer other than GPT-2's"
    elif pipeline and (model.get("ignore_merges") or model.get("continuing_subword_prefix")
                       or model.get("end_of_word_suffix")):
        differs = "uses BPE options GPT-2's tokenizer does not (ignore_merges or subword affixes)"
    if differs is not None:
        raise UserError(f"this byte-level BPE tokenizer {differs}; minilm's (minilm/bpe.py) encodes as GPT-2 and "
                        "RoBERTa do and would give other ids than the model was trained with, so it is not supported")


def _check_bert_pipeline(pipeline: dict) -> dict:
    """tokenizer.json's BertNormalizer settings as tokenizer_config.json keys ({} without one);
    a UserError for a WordPiece pipeline minilm/wordpiece.py does not reproduce."""
    if not pipeline:
        return {}
    normalizer, pre = pipeline.get("normalizer") or {}, pipeline.get("pre_tokenizer") or {}
    if normalizer.get("type") != "BertNormalizer" or pre.get("type") != "BertPreTokenizer" \
            or not normalizer.get("clean_text", True) or not normalizer.get("handle_chinese_chars", True):
        raise UserError(f"this WordPiece tokenizer cuts text with {normalizer.get('type')} and {pre.get('type')}, "
                        "not BERT's own normalizer and pre-tokenizer; minilm (minilm/wordpiece.py) would give other "
                        "ids than the model was trained with, so it is not supported")
    return {"do_lower_case": normalizer.get("lowercase", True), "strip_accents": normalizer.get("strip_accents")}


def _why_no_tokenizer(files: dict) -> str:
    if "tokenizer.json" in files:
        return ("its tokenizer.json is neither a byte-level BPE nor a WordPiece model; minilm reads vocab.json + "
                "merges.txt (GPT-2, RoBERTa), a sentencepiece tokenizer.model (Llama) or BERT's vocab.txt: download "
                "those files of the model too")
    return ("no tokenizer files (vocab.json + merges.txt, tokenizer.model or vocab.txt); download the model's "
            "tokenizer too")


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
    transformers' fill-mask pipeline its mask). A model with minilm's layout but a dummy prefix
    (as minilm's first releases trained) gets the prefix in the file too; one that normalizes
    text (NFKC) is a UserError: no tokenizer.json written here would give its ids."""
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
        written = {"tokenizer.json": sentencepiece_bpe_json(tokenizer.sp, dummy_prefix=spec["add_dummy_prefix"],
                                                             literal_spaces=False, special_below=0),
                   "tokenizer_config.json": config}
        paths = [p for p in paths if os.path.basename(p) not in written]
    else:
        names = {key: tokenizer.id_to_piece(slot) for slot, key in SLOT_KEYS.items()}
        # a model minilm trained has no dummy prefix; one trained before it said so (or elsewhere,
        # with minilm's layout) may have one, or a normalization no tokenizer.json here reproduces
        spec = read_sentencepiece_settings(tokenizer.model_bytes)
        if not (spec["model_type"] == 2 and spec["normalizer"] == "identity" and spec["escape_whitespaces"]
                and not spec["remove_extra_whitespaces"]):
            raise UserError(f"this tokenizer normalizes text ({spec['normalizer']}"
                            f"{', extra whitespace removed' if spec['remove_extra_whitespaces'] else ''}), which the "
                            "tokenizer.json minilm writes does not reproduce; train the model with minilm's own "
                            "tokenizer (leave out --tokenizer) to export it")
        written = {"tokenizer.json": sentencepiece_bpe_json(tokenizer.sp, dummy_prefix=spec["add_dummy_prefix"]),
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


def sentencepiece_bpe_json(sp, *, dummy_prefix: bool = False, literal_spaces: bool = True,
                           special_below: int = NUM_SPECIAL) -> dict:
    """A Hugging Face tokenizer.json that encodes as a sentencepiece BPE model with identity
    normalization does (minilm's, or a foreign one such as Llama's).

    sentencepiece's BPE writes each space as "▁" (and one before the text: dummy_prefix), starts
    from the characters and repeatedly merges the adjacent pair whose concatenation is the piece
    of highest score; a character with no piece becomes its UTF-8 byte pieces <0xNN>. Hugging
    Face's BPE model does the same with a ranked list of merges and byte_fallback, so:
      * vocab: every piece at its id. literal_spaces (minilm's): "▁" is written as the space it
        stands for, so no normalizer is needed (a Prepend of " " for a dummy prefix) and a "▁"
        typed in a text has no piece and falls back to its three bytes, as minilm's encode
        writes it. Otherwise "▁" stays, and a normalizer writes spaces as "▁" as sentencepiece
        does, a typed "▁" then being a space too (as it is to sentencepiece).
      * merges: every split of each ordinary piece into two pieces, ranked by the merged piece's
        score (best first): whichever halves the text's characters reach, the pair merges at the
        piece's rank. No pre-tokenizer: sentencepiece merges across the whole text too (its pieces
        hold a space only at the start, or only spaces).
      * the special pieces (control pieces, <unk>, ids below special_below: minilm's reserved
        ones) are added tokens: never produced by merges, skipped by decode(skip_special_tokens=True).
    """
    V = sp.get_piece_size()
    special = [sp.is_control(i) or sp.is_unknown(i) or i < special_below for i in range(V)]
    keep = [special[i] or sp.is_byte(i) or not literal_spaces for i in range(V)]   # pieces written as they are
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
    space = " " if literal_spaces else WORD_MARK
    normalizers = ([{"type": "Prepend", "prepend": space}] if dummy_prefix else []) + (
        [] if literal_spaces else [{"type": "Replace", "pattern": {"String": " "}, "content": WORD_MARK}])
    decoders = (([] if literal_spaces else [{"type": "Replace", "pattern": {"String": WORD_MARK}, "content": " "}])
                + [{"type": "ByteFallback"}, {"type": "Fuse"}]
                + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if dummy_prefix else []))
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers} if normalizers else None,
        "pre_tokenizer": None, "post_processor": None,
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
