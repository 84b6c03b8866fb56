"""Caption tokenization in the loader, with the reference recipe's training augmentation.

Augmentation (VSE∞, Chen et al. CVPR 2021, lib/datasets/image_caption.py; used by USER): each word,
with its word pieces, is altered with probability 0.2: 50% of those become [MASK] pieces, 10%
random vocabulary pieces, 40% are deleted. Only in training; the draws are a pure function of a key the
caller gives per caption (trainer/counter_random.py), so they do not depend on how captions are grouped.
"""

from __future__ import annotations

import itertools

import numpy as np

from userpipe.trainer.counter_random import hashed, uniform

ALTER_PROB = 0.2
MASK_SHARE, RANDOM_SHARE = 0.5, 0.1  # the remaining 0.4 of altered words are deleted
UNSET_MAX_LENGTH = 10**6  # transformers' model_max_length is a huge sentinel when a tokenizer states none


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer by hub name or local folder (offline: a folder, or a cached name)."""
    from transformers import AutoTokenizer

    from userpipe.schemas.errors import InputError

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load tokenizer '{name_or_path}': {str(exc).splitlines()[0]}") from None


class CaptionTokenizer:
    def __init__(self, tokenizer, max_tokens: int | None = None):
        """`max_tokens`: cut longer captions before [SEP]; None: the tokenizer's own model maximum, if any."""
        own = tokenizer.model_max_length
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens or (own if own < UNSET_MAX_LENGTH else None)
        self.vocab_size = tokenizer.vocab_size
        self.cls, self.sep, self.mask = (
            tokenizer.cls_token_id,
            tokenizer.sep_token_id,
            tokenizer.mask_token_id,
        )
        # a fast tokenizer's Rust core, called directly: transformers' conversion of each encoding to
        # Python lists cost ~45 µs a caption; its own truncation and padding settings are off, as in a call
        # with add_special_tokens=False and nothing else
        self.backend = None
        if (backend := getattr(tokenizer, "backend_tokenizer", None)) is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()

    @classmethod
    def for_text_model(cls, text_model: str, max_tokens: int | None = None) -> CaptionTokenizer:
        """The tokenizer of a `ModelConfig.text_model` ("package:NAME", hub name or local folder)."""
        from userpipe.trainer.model import resolve_text_model

        return cls(load_tokenizer(resolve_text_model(text_model)), max_tokens)

    def __call__(self, text: str, key: int | None = None) -> list[int]:
        """Token ids with [CLS]/[SEP]; `key` given = training augmentation drawn from it (counter_random)."""
        return self.many([text], None if key is None else np.array([key])).pop().tolist()

    def many(self, texts: list[str], keys: np.ndarray | None = None) -> list[np.ndarray]:
        """The ids of each caption, in one tokenizer call (its overhead per call is most of what a short
        caption costs); with `keys` (one integer per caption), augmented as the module says."""
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            pieces, words = [e.ids for e in encodings], [e.word_ids for e in encodings]
        else:
            encoded = self.tokenizer(texts, add_special_tokens=False)
            pieces, words = encoded["input_ids"], [encoded.word_ids(i) for i in range(len(texts))]
        if not texts:
            return []
        lengths = np.array([len(p) for p in pieces], np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(pieces), np.int64, int(lengths.sum()))
        caption = np.repeat(np.arange(len(texts)), lengths)
        if keys is not None:
            ids, caption = self._augmented(ids, caption, lengths, words, np.asarray(keys))
            lengths = np.bincount(caption, minlength=len(texts))
        if self.max_tokens is not None:  # cut before [SEP]
            position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            kept = position < self.max_tokens - 2
            ids, caption = ids[kept], caption[kept]
            lengths = np.minimum(lengths, self.max_tokens - 2)
        framed = np.empty(len(ids) + 2 * len(texts), np.int64)  # each caption: [CLS] ids [SEP]
        ends = np.cumsum(lengths + 2)
        framed[ends - lengths - 2], framed[ends - 1] = self.cls, self.sep
        framed[np.arange(len(ids)) + 2 * caption + 1] = ids
        return np.split(framed, ends[:-1])

    def _augmented(
        self,
        ids: np.ndarray,
        caption: np.ndarray,
        lengths: np.ndarray,
        words: list[list[int | None]],
        keys: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The augmentation of all pieces at once: a word is a run of pieces with one word id; the draw of
        word w of caption c is uniform(key_c, w), the random id of its piece p is hashed(key_c, -1 - p)."""
        every_word = itertools.chain.from_iterable(words)
        word = np.fromiter((-1 if w is None else w for w in every_word), np.int64, len(ids))
        first = np.cumsum(lengths) - lengths  # each caption's first piece
        starts = np.ones(len(ids), bool)
        starts[1:] = word[1:] != word[:-1]
        starts[first[lengths > 0]] = True
        group = np.cumsum(starts) - 1
        word_of_caption = group - np.repeat(group[first[lengths > 0]], lengths[lengths > 0])
        draw = uniform(keys[caption], word_of_caption) / ALTER_PROB  # < 1: the word is altered
        masked = draw < MASK_SHARE
        replaced = (draw >= MASK_SHARE) & (draw < MASK_SHARE + RANDOM_SHARE)
        piece_of_caption = np.arange(len(ids)) - np.repeat(first, lengths)
        random_ids = hashed(keys[caption], -1 - piece_of_caption) % np.uint64(self.vocab_size)
        out = np.where(masked, self.mask, np.where(replaced, random_ids.astype(np.int64), ids))
        kept = (draw >= 1) | masked | replaced  # the rest of the altered words are deleted
        return out[kept], caption[kept]
