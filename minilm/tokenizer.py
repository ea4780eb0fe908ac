"""A thin wrapper around a sentencepiece BPE model that we train on the user's own text.

Decisions that matter for the rest of the library:
  * Special tokens sit at fixed ids in every tokenizer minilm trains, so objectives can refer to
    them without looking anything up:
        0 <pad>  1 <unk>  2 <bos>  3 <eos>  4 <mask>  5 <cls>  6 <sep>
        7 .. 106    <extra_id_0> .. <extra_id_99>   (T5 span-corruption sentinels)
        107 .. 114  <lang_0> .. <lang_7>            (language tags for translation LM)
    They are inserted by id only (by prepare, the objectives, sample.py), never produced from text:
    the text "<mask>" in a corpus or a prompt is ordinary text and encodes to ordinary
    pieces. The reserved pieces 4..114 are sentencepiece *control* symbols, like pad/bos/eos,
    which sentencepiece never matches in its input. decode drops every special id (a control
    piece decodes to ""); decode(ids, specials=True) writes the reserved ones by name, e.g.
    "<mask>" or "<extra_id_0>", for a person reading fill-mask or span-corruption output.
    A model is loaded (--tokenizer, a checkpoint's) only when it has this layout and byte fallback
    (`_why_not_minilm`): ordinary pieces at reserved ids would be taken for the objectives' markers.
  * A tokenizer whose reserved pieces are sentencepiece "user-defined" symbols (as in out_dirs and
    checkpoints of earlier minilm releases) would match "<mask>" typed in a document as id 4. It
    keeps its ids: it is recognised when loaded (`escapes_reserved_text`) and encode escapes the
    text instead, encoding the "<" that starts a reserved name on its own so the name can never
    match (texts with a "<" pay for one regex search; only those that spell a reserved name are
    encoded again). Its decode drops reserved ids as any minilm tokenizer's does. Token files it
    prepared may hold special ids where the corpus spelled a reserved name; train.py tokenizes
    them again (see README.md, "Your own data"). A newly trained tokenizer has different model
    bytes, hence a different fingerprint, so data it did not prepare is never taken for its own.
  * Normalization is the identity and whitespace is kept as is, with byte fallback for any
    character that did not make it into the vocabulary: decode(encode(text)) == text for every
    Unicode string (tabs, repeated spaces, newlines, emoji, CJK), and nothing ever maps to <unk>.
    A literal "\u2581" in the text is sentencepiece's own space marker, which it would decode as a
    space; encode writes it as its three UTF-8 bytes (byte-fallback pieces) instead, so it too
    comes back as itself.
  * No "dummy prefix": sentencepiece would otherwise glue a "▁" the text does not have onto every
    encoded string, so "<mask>" would be two ids, the bytes of the pieces would not add up to the
    bytes of the text (bits per byte), and a document encoded in chunks would decode with an extra
    space at each cut. Without it, encode(a + b) == encode(a) + encode(b) whenever a ends in "\n".
  * Word starts: a piece that begins with "▁" (U+2581, sentencepiece's space marker) starts a word;
    so does the first piece of a text and the piece after a newline or tab byte. Whole-word and
    span masking use these flags; we never rely on BERT's "##" convention.
  * Sentence ends: per-id tables say which pieces can end a sentence, which are whitespace and
    which are closing quotes or brackets glued to the previous piece; minilm/data/segment_pairs.py
    combines them with the following piece to split documents into sentences (`_build_tables`).
"""
from __future__ import annotations

import io
import os
import random
import re
from typing import Iterable, Iterator

import torch

from minilm.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MASK_ID, CLS_ID, SEP_ID = 4, 5, 6
NUM_SENTINELS = 100
NUM_LANG_TAGS = 8
SENTINEL_IDS = list(range(7, 7 + NUM_SENTINELS))
LANG_IDS = list(range(7 + NUM_SENTINELS, 7 + NUM_SENTINELS + NUM_LANG_TAGS))
NUM_SPECIAL = 7 + NUM_SENTINELS + NUM_LANG_TAGS  # ids below this are special
# the pieces at ids 4 .. NUM_SPECIAL - 1, in id order (sentencepiece control symbols)
RESERVED_PIECES = (["<mask>", "<cls>", "<sep>"] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
                   + [f"<lang_{i}>" for i in range(NUM_LANG_TAGS)])
USER_DEFINED = RESERVED_PIECES  # another name for them, kept for code that imports it
WORD_MARK = "\u2581"
# sentencepiece needs room for the specials, 256 byte pieces and some merges
MIN_VOCAB = NUM_SPECIAL + 256 + 16
SENTENCE_STOPS = ".!?\u2026\u3002\uff01\uff1f"   # . ! ? … and the CJK full-width 。！？
CLOSERS = "\"')]}\u201d\u2019\u00bb"           # " ' ) ] } ” ’ »: may follow a stop (`He said "no."`)


def _import_spm():
    import sentencepiece as spm  # imported lazily: a clear error if missing, fast `--help`
    return spm


class Tokenizer:
    """Encode/decode text with a trained sentencepiece model; knows the special ids."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    mask_id, cls_id, sep_id = MASK_ID, CLS_ID, SEP_ID
    sentinel_ids, lang_ids = SENTINEL_IDS, LANG_IDS
    foreign_ids = None   # a ForeignTokenizer's id reordering (foreign_tokenizer.py); minilm's own has none

    def __init__(self, model_bytes: bytes):
        spm = _import_spm()
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
        except Exception:
            raise UserError("the tokenizer data is not a sentencepiece model; retrain it by running "
                            "train.py without --resume in a new --out_dir") from None
        missing = _why_not_minilm(self.sp)
        if missing is not None:
            raise UserError(f"this sentencepiece model was not trained by minilm: {missing}; minilm needs <pad> "
                            f"<unk> <bos> <eos> at ids 0-3, its reserved pieces <mask> .. <lang_{NUM_LANG_TAGS - 1}> "
                            f"at ids {MASK_ID}-{NUM_SPECIAL - 1} and byte fallback: let train.py train its own "
                            "tokenizer (leave out --tokenizer)")
        self.vocab_size = self.sp.get_piece_size()
        # reserved pieces that sentencepiece would match in text: all of them in a tokenizer
        # trained before they were control symbols, none in a new one (module docstring)
        matched = [self.sp.id_to_piece(i) for i in range(MASK_ID, NUM_SPECIAL) if not self.sp.is_control(i)]
        self.escapes_reserved_text = bool(matched)
        self._build_escapes(matched)
        self._build_tables()

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, character_coverage: float = 0.9995,
              sample_lines: int = 2_000_000, seed: int = 0) -> "Tokenizer":
        """Train BPE on an iterable of documents.

        Documents are split into lines (sentencepiece's unit); at most `sample_lines` lines are
        kept by reservoir sampling, so memory stays bounded on a corpus of any size.
        """
        spm = _import_spm()
        if vocab_size < MIN_VOCAB:
            raise UserError(f"vocab_size {vocab_size} is too small: minilm needs at least {MIN_VOCAB} "
                            f"({NUM_SPECIAL} special ids + 256 byte pieces + a few merges)")
        lines = _reservoir(_lines_of(texts), sample_lines, seed)
        if not lines:
            raise UserError("the corpus has no text to train a tokenizer on; check --data")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                control_symbols=RESERVED_PIECES, byte_fallback=True,  # never matched in text
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False,  # see the module docstring
                allow_whitespace_only_pieces=True, split_digits=True,
                character_coverage=character_coverage, max_sentence_length=1 << 16,
                train_extremely_large_corpus=False, num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as err:
            msg = str(err)
            if "smaller than required_chars" in msg:
                # every character of the corpus needs its own piece: "... 400 vs 453. Increase ..."
                need = msg.split(" vs ", 1)[-1].split(".", 1)[0] if " vs " in msg else "more"
                raise UserError(f"vocab_size {vocab_size} is too small for the characters of this corpus "
                                f"(it needs at least {need}); pass a larger --vocab_size") from None
            if "Vocabulary size too high" in msg or "vocab_size" in msg.lower():
                limit = msg.rsplit("<=", 1)[-1].strip(" .") if "<=" in msg else "smaller"
                raise UserError(f"vocab_size {vocab_size} is more than this corpus supports "
                                f"(sentencepiece allows at most {limit}); pass a smaller "
                                "--vocab_size or give more text") from None
            raise UserError(f"sentencepiece could not train on this corpus: {msg.splitlines()[-1]}") from None
        return cls(model.getvalue())

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        out = self.sp.encode(texts)  # one call for the whole batch
        for i, text in enumerate(texts):
            if self._needs_escapes(text):  # rare: re-encode it around what must not be matched
                out[i] = self._encode_escaped(text)
        return [([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else []) for ids in out]

    def _build_escapes(self, matched_pieces: list[str]) -> None:
        """What encode cuts out of a text and encodes on its own (module docstring):
        a literal "▁" becomes its three UTF-8 bytes; the "<" that starts a reserved name this model
        would match (old tokenizers only) becomes the pieces of "<" alone."""
        # the byte-fallback ids of "▁" (E2 96 81), for texts that contain it literally
        self.word_mark_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in WORD_MARK.encode("utf-8")]
        self._escape_ids = {WORD_MARK: self.word_mark_bytes}
        pattern = re.escape(WORD_MARK)
        self._reserved_name = None
        if matched_pieces:
            self._reserved_name = re.compile("|".join(re.escape(p) for p in matched_pieces))
            # the "<" of a reserved name, not the name: "<<mask>" cuts at its second "<" only
            pattern += "|<(?=" + "|".join(re.escape(p[1:]) for p in matched_pieces) + ")"
            self._escape_ids["<"] = self.sp.encode("<")
        # a capturing group: split() keeps what it cut at, between the pieces of text
        self._escape_pattern = re.compile(f"({pattern})")

    def _needs_escapes(self, text: str) -> bool:
        return WORD_MARK in text or (self._reserved_name is not None and "<" in text
                                     and self._reserved_name.search(text) is not None)

    def _encode_escaped(self, text: str) -> list[int]:
        # "a<mask>▁b" -> ["a", "<", "mask>", "▁", "b"]: text at even places, cut marks at odd ones.
        # Reserved names start with "<" and hold no other "<", so no two overlap and none is left
        # whole inside a piece of text: cutting off each one's "<" leaves nothing to match.
        parts = self._escape_pattern.split(text)
        encoded = self.sp.encode(parts[0::2])
        ids = list(encoded[0])
        for mark, piece in zip(parts[1::2], encoded[1:]):
            ids += self._escape_ids[mark]
            ids += piece
        return ids

    def decode(self, ids, *, specials: bool = False) -> str:
        """The text of `ids`. Special ids print nothing, unless specials=True: then the reserved ones
        (<mask>, <cls>, <sep>, <extra_id_N>, <lang_N>) print their names; pad/bos/eos never do."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if not (specials or self.escapes_reserved_text):
            return self.sp.decode(ids)  # every special id is a control piece, which decodes to ""
        reserved = [k for k, i in enumerate(ids) if MASK_ID <= i < NUM_SPECIAL]
        # decode the runs between reserved ids; each of those prints its name or nothing
        cuts = [-1] + reserved + [len(ids)]
        texts = self.sp.decode([ids[a + 1:b] for a, b in zip(cuts, cuts[1:])])
        names = [self.sp.id_to_piece(ids[k]) if specials else "" for k in reserved] + [""]
        return "".join(text + name for text, name in zip(texts, names))

    def decode_batch(self, batch, *, specials: bool = False) -> list[str]:
        return [self.decode(ids, specials=specials) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    # ------------------------------------------------------------------ per-id tables
    def _build_tables(self) -> None:
        """Tensors indexed by token id, so per-token facts are one gather, never a Python loop."""
        V = self.vocab_size
        starts_word = torch.zeros(V, dtype=torch.bool)
        breaks_line = torch.zeros(V, dtype=torch.bool)   # newline/tab bytes: the next piece starts a word
        n_bytes = torch.zeros(V, dtype=torch.long)       # UTF-8 bytes this piece stands for
        special = torch.zeros(V, dtype=torch.bool)
        # for sentence splitting (the rule itself is minilm/data/segment_pairs.py, `split_sentences`):
        ends_stop = torch.zeros(V, dtype=torch.bool)     # text ends in . ! ? (+ closers): `end.` `."` `).`
        ends_cjk_stop = torch.zeros(V, dtype=torch.bool)  # ... in a CJK 。！？: ends a sentence, no space needed
        closer = torch.zeros(V, dtype=torch.bool)        # only closers, glued to the previous piece: `"` `)`
        whitespace = torch.zeros(V, dtype=torch.bool)    # only spaces, tabs, newlines: `▁▁` <0x0A>
        newline = torch.zeros(V, dtype=torch.bool)       # the newline byte (blank lines end paragraphs)
        starts_lower = torch.zeros(V, dtype=torch.bool)  # first letter is lowercase: `▁the`, `os`
        for i in range(V):
            piece = self.sp.id_to_piece(i)
            if i < NUM_SPECIAL or self.sp.is_control(i) or self.sp.is_unknown(i):
                special[i] = True
                starts_word[i] = True
                continue
            if self.sp.is_byte(i):
                value = int(piece[3:5], 16)
                n_bytes[i] = 1
                breaks_line[i] = value in (0x0A, 0x09, 0x0D)
                whitespace[i] = value in (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20)
                newline[i] = value == 0x0A
                continue
            starts_word[i] = piece.startswith(WORD_MARK)
            n_bytes[i] = len(piece.replace(WORD_MARK, " ").encode("utf-8"))
            text = piece.replace(WORD_MARK, " ")
            whitespace[i], starts_lower[i], ends_stop[i], ends_cjk_stop[i], closer[i] = text_facts(text)
        self.starts_word_table = starts_word
        self.breaks_line_table = breaks_line
        self.bytes_per_token = n_bytes
        self.special_table = special
        self.ends_stop_table = ends_stop
        self.ends_cjk_stop_table = ends_cjk_stop
        self.closer_table = closer
        self.whitespace_table = whitespace
        self.newline_table = newline
        self.starts_lower_table = starts_lower

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor like `ids`: True where a piece begins a new word (see module docstring).

        Each row is taken to start a text, so its first piece always starts a word.
        """
        return word_starts_from_tables(ids, self.starts_word_table.to(ids.device),
                                       self.breaks_line_table.to(ids.device))

    def is_special(self, ids: torch.Tensor) -> torch.Tensor:
        return self.special_table.to(ids.device)[ids]

    # ------------------------------------------------------------------ save / load
    def save(self, path: str) -> None:
        from minilm.checkpoint import atomic_write_bytes
        atomic_write_bytes(path, self.model_bytes)

    @classmethod
    def load(cls, path: str):
        """The tokenizer saved at `path`: minilm's own (a sentencepiece model) or a foreign one
        (minilm/foreign_tokenizer.py), whichever its bytes are."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise UserError(f"cannot read tokenizer {path}: {err.strerror}") from None
        return tokenizer_from_bytes(data)


def tokenizer_from_bytes(data: bytes):
    """A Tokenizer, or a ForeignTokenizer (a public model's, imported with its weights), from the
    bytes a checkpoint, a token folder or out_dir/tokenizer.model keeps of it: each kind knows its own."""
    from minilm.foreign_tokenizer import ForeignTokenizer
    if ForeignTokenizer.is_serialized(data):
        return ForeignTokenizer.from_bytes(data)
    return Tokenizer(data)


def _why_not_minilm(sp) -> str | None:
    """What a sentencepiece model lacks of the layout every minilm tokenizer has (module docstring),
    or None: a model that merely has <pad> at 0 and <mask> at 4 would turn ordinary words into
    sentinel or language ids, which the objectives take for their own markers."""
    for name, got, want in (("<pad>", sp.pad_id(), PAD_ID), ("<unk>", sp.unk_id(), UNK_ID),
                            ("<bos>", sp.bos_id(), BOS_ID), ("<eos>", sp.eos_id(), EOS_ID)):
        if got != want:
            return f"its {name} is id {got}, not {want}" if got >= 0 else f"it has no {name}"
    size = sp.get_piece_size()
    for i, piece in enumerate(RESERVED_PIECES, MASK_ID):
        # control pieces; user-defined in tokenizers minilm trained before (module docstring)
        if i >= size:
            return f"it has {size} pieces, so no {piece} at id {i}"
        if sp.id_to_piece(i) != piece:
            return f"id {i} is the piece {sp.id_to_piece(i)!r}, not {piece}"
    for value in range(256):
        byte = f"<0x{value:02X}>"
        if not sp.is_byte(sp.piece_to_id(byte)):
            return f"it has no byte fallback (no byte piece {byte})"
    return None


def word_starts_from_tables(ids: torch.Tensor, starts_word_table: torch.Tensor,
                            breaks_line_table: torch.Tensor) -> torch.Tensor:
    """Tokenizer.word_starts from its two per-id tables, for callers that keep the tables on
    their device as buffers (the masked-LM objectives) instead of copying them at every call."""
    starts = starts_word_table[ids]
    after_break = torch.zeros_like(starts)
    after_break[..., 1:] = breaks_line_table[ids[..., :-1]]
    starts = starts | after_break
    starts[..., 0] = True
    return starts


# Chinese and Japanese corner brackets and full-width closers close a quote after 。 as " does after .
ALL_CLOSERS = CLOSERS + "\u300d\u300f\u3011\u3015\u3009\u300b\uff09\uff02\uff07"   # 」』】〕〉》）＂＇
CJK_STOPS = "\u3002\uff01\uff1f\uff61"        # 。！？｡


def text_facts(text: str) -> tuple[bool, bool, bool, bool, bool]:
    """What sentence splitting needs to know of a piece whose text (spaces as " ") is `text`:
    (only whitespace, first letter lowercase, ends in a stop, ends in a CJK stop, only closers
    glued to the previous piece). Shared by every tokenizer kind's per-id tables."""
    word = text.lstrip()
    before_closers = word.rstrip(ALL_CLOSERS)
    ends_stop = before_closers != "" and before_closers[-1] in SENTENCE_STOPS + CJK_STOPS
    ends_cjk_stop = before_closers != "" and before_closers[-1] in CJK_STOPS
    closer = text == word and word != "" and word.strip(ALL_CLOSERS) == ""
    return text.isspace(), word[:1].islower(), ends_stop, ends_cjk_stop, closer


MAX_LINE_CHARS = 4096  # sentencepiece skips lines over max_sentence_length (64 KB): cut them first


def _lines_of(texts: Iterable[str], max_chars: int = MAX_LINE_CHARS) -> Iterator[str]:
    """The non-blank lines of the texts, sentencepiece's training unit. A line longer than
    max_chars is cut into parts of at most max_chars, each just before a run of spaces (where a
    `▁word` piece starts; anywhere if the part has no space): sentencepiece would skip the whole
    line, and a corpus with no newlines at all would leave it nothing to train on."""
    for text in texts:
        for line in text.split("\n"):
            start = 0
            while len(line) - start > max_chars:
                last = line.rfind(" ", start + 1, start + max_chars + 1)  # a run may start at max_chars
                run = len(line[start:last].rstrip(" ")) if last > 0 else 0
                cut = start + (run or max_chars)
                if line[start:cut].strip():
                    yield line[start:cut]
                start = cut
            if line[start:].strip():
                yield line[start:]


def _reservoir(items: Iterable[str], k: int, seed: int) -> list[str]:
    """Uniform sample of k items from a stream of unknown length (Algorithm R)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            sample.append(item)
        else:
            j = rng.randint(0, n)
            if j < k:
                sample[j] = item
    return sample
