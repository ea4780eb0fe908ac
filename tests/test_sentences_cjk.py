"""Chinese sentences end in 。！？ with no space after them, so the English rule (a stop, then a
new word) never split them: a Chinese corpus made zero sentence pairs. After a CJK stop a
sentence now ends whatever follows (minilm/data/segment_pairs.py, split_sentences, rule (b))."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from minilm.data import SegmentPairSource, prepare, split_sentences
from minilm.tokenizer import CLS_ID, EOS_ID, SEP_ID, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SUBJECTS = ["我", "你", "他", "她", "我们", "老师", "学生", "小明", "妈妈", "朋友"]
VERBS = ["喜欢", "看见", "想要", "买了", "读了", "写了", "找到", "记得"]
OBJECTS = ["一本书", "苹果", "这个城市", "那只猫", "新的电脑", "中国菜", "音乐", "大海"]


def chinese_documents(n_docs: int = 80, seed: int = 0) -> list[list[str]]:
    """Documents as lists of sentences, no spaces anywhere; some sentences are quotes closed
    after the stop (他说「……。」), where the sentence ends after the bracket."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            core = rng.choice(SUBJECTS) + rng.choice(VERBS) + rng.choice(OBJECTS) + rng.choice("。！？")
            sentences.append(f"{rng.choice(SUBJECTS)}说「{core}」" if rng.random() < 0.2 else core)
        docs.append(sentences)
    return docs


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    docs = chinese_documents()
    texts = ["".join(d) for d in docs]
    folder = tmp_path_factory.mktemp("chinese")
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts),
                                         encoding="utf-8")
    tokenizer = Tokenizer.train(texts, vocab_size=500, character_coverage=1.0)
    prepare(str(folder / "corpus.jsonl"), tokenizer, str(folder / "prepared"), val_fraction=0.1, num_workers=1,
            log=lambda *_: None)
    return {"".join(d): d for d in docs}, tokenizer, str(folder / "prepared")


def test_cjk_stops_split_sentences_without_spaces(chinese):
    sentences_of, tokenizer, folder = chinese
    piece = tokenizer.sp.piece_to_id
    assert all(tokenizer.ends_cjk_stop_table[piece(p)] for p in "。！？")
    assert tokenizer.closer_table[piece("」")] and not tokenizer.ends_cjk_stop_table[:EOS_ID + 1].any()
    tokens = np.memmap(f"{folder}/train.bin", dtype=np.uint16, mode="r")
    starts, ends, documents = split_sentences(tokens, tokenizer)
    found: dict[int, list[str]] = {}
    for a, b, d in zip(starts, ends, documents):
        found.setdefault(int(d), []).append(tokenizer.decode(tokens[a:b].tolist()))
    assert len(found) >= 60
    for sentences in found.values():           # each document's sentences, exactly as written
        assert sentences == sentences_of["".join(sentences)]
    assert len(starts) / len(found) > 3        # several sentences per document (2 to 6, mean 4)


def test_a_chinese_corpus_makes_sentence_pairs(chinese):
    sentences_of, tokenizer, folder = chinese
    source = SegmentPairSource(folder, "train", 64, 32, seed=0, log=lambda *_: None)
    assert source.skipped_documents == 0
    batch = source.batch(0)
    for row in range(32):
        ids = batch["input_ids"][row].tolist()
        a_len, b_len = int(batch["a_lengths"][row]), int(batch["b_lengths"][row])
        assert ids[0] == CLS_ID and ids[a_len + 1] == SEP_ID and ids[a_len + b_len + 2] == SEP_ID
        a, b = tokenizer.decode(ids[1:a_len + 1]), tokenizer.decode(ids[a_len + 2:a_len + b_len + 2])
        # A then B: runs of whole sentences of one document, B right after A (no truncation:
        # seq_len 64 holds any two sentences here)
        document = next(d for text, d in sentences_of.items() if a + b in text)
        cuts = set(np.cumsum([0] + [len(s) for s in document]).tolist())   # sentence boundaries
        at = "".join(document).index(a + b)
        assert {at, at + len(a), at + len(a) + len(b)} <= cuts, (a, b, document)
        assert EOS_ID not in ids
