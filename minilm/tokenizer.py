"""A thin wrapper around a sentencepiece BPE model that we train on the user's own text.

Decisions that matter later:
  * Special tokens sit at fixed ids in every tokenizer minilm trains, so objectives can refer to
    them without looking anything up:
        0 <pad>  1 <unk>  2 <bos>  3 <eos>  4 <mask>  5 <cls>  6 <sep>
        7 .. 106    <extra_id_0> .. <extra_id_99>   (T5 span-corruption sentinels)
        107 .. 114  <lang_0> .. <lang_7>            (language tags for translation LM)
    They are sentencepiece "user-defined" pieces, so the text "<mask>" encodes to id 4 and
    decodes back to "<mask>".
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
    which are closing quotes or brackets glued to the previous piece; minilm/data.py combines
    them with the following piece to split documents into sentences (see `_build_tables`).
"""
from __future__ import annotations

import io
import os
import random
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
USER_DEFINED = (["<mask>", "<cls>", "<sep>"] + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]
                + [f"<lang_{i}>" for i in range(NUM_LANG_TAGS)])
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

    def __init__(self, model_bytes: bytes):
        spm = _import_spm()
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
        except Exception:
            raise UserError("the tokenizer data is not a sentencepiece model; retrain it by running "
                            "train.py without --resume in a new --out_dir") from None
        if self.sp.piece_to_id("<mask>") != MASK_ID or self.sp.pad_id() != PAD_ID:
            raise UserError("this sentencepiece model was not trained by minilm (special ids differ); "
                            "let train.py train its own tokenizer")
        self.vocab_size = self.sp.get_piece_size()
        # the byte-fallback ids of "▁" (E2 96 81), for texts that contain it literally
        self.word_mark_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in WORD_MARK.encode("utf-8")]
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
                user_defined_symbols=USER_DEFINED, byte_fallback=True,
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
        out = self.sp.encode(texts)
        for i, text in enumerate(texts):
            if WORD_MARK in text:  # rare: re-encode around each literal "▁" (module docstring)
                out[i] = self._encode_with_word_marks(text)
        return [([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else []) for ids in out]

    def _encode_with_word_marks(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self.sp.encode(text.split(WORD_MARK))):
            if i:
                ids += self.word_mark_bytes
            ids += part
        return ids

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # pad/bos/eos are control pieces that sentencepiece decodes to "", which is what we want
        return self.sp.decode([int(i) for i in ids])

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

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
        # for sentence splitting (the rule itself is minilm/data.py, `split_sentences`):
        ends_stop = torch.zeros(V, dtype=torch.bool)     # text ends in . ! ? (+ closers): `end.` `."` `).`
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
            whitespace[i] = text.isspace()
            word = text.lstrip()
            starts_lower[i] = word[:1].islower()
            before_closers = word.rstrip(CLOSERS)
            ends_stop[i] = before_closers != "" and before_closers[-1] in SENTENCE_STOPS
            closer[i] = text == word and word != "" and word.strip(CLOSERS) == ""
        self.starts_word_table = starts_word
        self.breaks_line_table = breaks_line
        self.bytes_per_token = n_bytes
        self.special_table = special
        self.ends_stop_table = ends_stop
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
    def load(cls, path: str) -> "Tokenizer":
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as err:
            raise UserError(f"cannot read tokenizer {path}: {err.strerror}") from None


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
