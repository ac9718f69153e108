"""Tests for mvae_course/data/text.py: WordPiece vocabulary, compact ids, round trips and padding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mvae_course.data import text

from mvae_course.data.text import (
    BERT_VOCAB_SIZE,
    BOS,
    EOS,
    PAD,
    UNK,
    CaptionTokenizer,
    bert_tokenizer,
    normalise,
    pad_captions,
    truncate_captions,
)
from conftest import need_coco_mini

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park!",
    "A skateboarder   performing a trick, mid-air, at the skate park.",
    "The café's menu: crêpes, 3.50 euros (each)... \"delicious\"",
    "A GIRAFFE standing next to a tall tree?",
    "  leading and trailing spaces  ",
    "",
]


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer.fit(CAPTIONS)


def test_bert_vocabulary_is_complete_and_read_without_transformers():
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from mvae_course.data.text import bert_tokenizer; "
         "bert = bert_tokenizer(); print(len(bert), bert.tokenize('skateboarding'), 'transformers' in sys.modules)"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert done.stdout.split(None, 1) == ["30522", "['skate', '##boarding'] False\n"], done.stdout
    bert = bert_tokenizer()
    assert len(bert) == BERT_VOCAB_SIZE and bert_tokenizer() is bert  # cached
    assert bert.convert_ids_to_tokens(bert.convert_tokens_to_ids(["skate", "##boarding", "notapiece"])) == [
        "skate", "##boarding", "[UNK]"]
    assert [bert.pad_token_id, bert.cls_token_id, bert.sep_token_id, bert.unk_token_id] == [0, 101, 102, 100]


def test_wordpiece_gives_what_transformers_bert_tokenizer_gives():
    from mvae_course.throughput import naive_tokenizer

    hf, bert = naive_tokenizer(), bert_tokenizer()
    long = " ".join(["skateboarding giraffes"] * 80)  # 480 wordpieces: past the file's 128-token truncation
    texts = CAPTIONS + [long, "Zoë's naïve café — 100% ÜBER-cool ☃ 日本"]
    want = hf(texts, add_special_tokens=False)["input_ids"]
    assert bert.encode_batch(texts) == want and len(want[-2]) == 480
    assert [bert.tokenize(t) for t in texts] == [hf.tokenize(t) for t in texts]
    assert [bert.decode(ids) for ids in want] == [hf.decode(ids) for ids in want]
    assert bert.get_vocab() == hf.get_vocab()


def test_normalise():
    assert normalise("  A  Café-Bike,  on the STREET!  ") == "a cafe - bike, on the street!"
    assert normalise("") == ""


@pytest.mark.parametrize("caption", CAPTIONS)
def test_round_trip_gives_the_normalised_caption(tok, caption):
    ids = tok.encode(caption)
    assert all(i >= 4 for i in ids)  # content ids only, all seen in training
    assert tok.decode(ids) == normalise(caption)
    bert = bert_tokenizer()
    assert tok.decode(ids) == bert.decode(bert.encode_batch([caption])[0])


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(CAPTIONS) == [tok.encode(c) for c in CAPTIONS]
    assert tok.encode_batch([]) == []


def test_tokenising_in_chunks_changes_nothing(tok, monkeypatch):
    whole = tok.encode_batch(CAPTIONS)
    monkeypatch.setattr(text, "TOKENIZE_CHUNK", 2)  # several chunks, the last one short
    assert tok.encode_batch(CAPTIONS) == whole
    assert CaptionTokenizer.fit(CAPTIONS).wordpieces == tok.wordpieces


def test_coco_mini_captions_round_trip():
    path = need_coco_mini() / "annotations" / "captions_train2017.json"
    captions = [a["caption"] for a in json.loads(path.read_text())["annotations"]]
    tok = CaptionTokenizer.fit(captions)
    decoded = tok.decode_batch(tok.encode_batch(captions))
    mismatched = [(c, d) for c, d in zip(captions, decoded) if d != normalise(c)]
    assert not mismatched, mismatched[:5]
    assert 4 < tok.vocab_size < 5000


def test_special_ids_and_frequency_order():
    tok = CaptionTokenizer.fit(["a cat", "a dog", "a cat on a mat"])
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert tok.wordpieces[:2] == ["a", "cat"]  # most frequent first
    assert tok.encode("a cat") == [4, 5]
    assert tok.vocab_size == len(tok) == 4 + len({"a", "cat", "dog", "on", "mat"})


def test_unknown_wordpieces_and_min_count_map_to_unk():
    tok = CaptionTokenizer.fit(["a cat", "a dog", "a cat"], min_count=2)
    assert tok.wordpieces == ["a", "cat"]
    assert tok.encode("a dog") == [4, UNK]
    assert tok.encode("a zebra") == [4, UNK]
    with pytest.raises(ValueError, match="min_count"):
        CaptionTokenizer.fit(["a"], min_count=0)


def test_specials_are_never_decoded(tok):
    a, b, c = tok.encode("man riding wave")
    assert tok.decode([BOS, a, PAD, UNK, b, c]) == "man riding wave"
    assert tok.decode([a, b, EOS, c]) == "man riding"  # stops at EOS
    assert tok.decode(torch.tensor([BOS, EOS, a])) == ""
    text, _ = pad_captions([[a, b], [c]])
    assert tok.decode_batch(text) == ["man riding", "wave"]


def test_wordpiece_ids_map_to_bert(tok):
    bert = bert_tokenizer()
    ids = tok.wordpiece_ids
    assert ids.dtype == torch.long and ids.shape == (tok.vocab_size,)
    assert bert.convert_ids_to_tokens(ids[:4].tolist()) == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert bert.convert_ids_to_tokens(ids[4:].tolist()) == tok.wordpieces


def test_pad_captions_pads_to_the_longest_in_the_batch():
    text, lengths = pad_captions([[4, 5, 6], [7], []])
    assert text.dtype == lengths.dtype == torch.long
    assert text.tolist() == [[4, 5, 6, EOS], [7, EOS, PAD, PAD], [EOS, PAD, PAD, PAD]]
    assert lengths.tolist() == [4, 2, 1]
    assert (text != PAD).sum(1).tolist() == lengths.tolist()
    text, _ = pad_captions([[9, 9]], pad_id=-1, eos_id=99)
    assert text.tolist() == [[9, 9, 99]]
    with pytest.raises(ValueError):
        pad_captions([])


def test_save_load(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = CaptionTokenizer.load(path)
    assert loaded.wordpieces == tok.wordpieces
    assert loaded.encode_batch(CAPTIONS) == tok.encode_batch(CAPTIONS)
    assert torch.equal(loaded.wordpiece_ids, tok.wordpiece_ids)


def test_load_bad_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CaptionTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        CaptionTokenizer.load(bad)
    bad.write_text(json.dumps(["a", "cat"]))
    with pytest.raises(ValueError, match="not a CaptionTokenizer file"):
        CaptionTokenizer.load(bad)
    CaptionTokenizer(["a", "cat"]).save(bad)
    data = json.loads(bad.read_text())
    data["wordpieces"].append("notawordpiecexyz")
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="notawordpiecexyz"):
        CaptionTokenizer.load(bad)


def test_truncate_captions_cuts_and_counts():
    ids = [[5, 6, 7, 8], [5], [], [9, 9, 9]]
    assert truncate_captions(ids, 3) == ([[5, 6, 7], [5], [], [9, 9, 9]], 1)
    assert truncate_captions(ids, None) == (ids, 0)
    for bad in (0, -1, 2.5, True, "32"):
        with pytest.raises(ValueError, match="max_caption_tokens must be a positive integer or None"):
            truncate_captions(ids, bad)
