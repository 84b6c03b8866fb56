"""Caption tokenization in the loader, with the reference recipe's training augmentation.

Augmentation (VSE∞, Chen et al. CVPR 2021, lib/datasets/image_caption.py; used by USER): each word,
with its word pieces, is altered with probability 0.2: 50% of those become [MASK] pieces, 10%
random vocabulary pieces, 40% are deleted. Only in training; the generator is seeded by the caller.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np

ALTER_PROB = 0.2
MASK_SHARE, RANDOM_SHARE = 0.5, 0.1  # the remaining 0.4 of altered words are deleted
UNSET_MAX_LENGTH = 10**6  # transformers' model_max_length is a huge sentinel when a tokenizer states none


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer by hub name or local folder (offline: a folder, or a cached name)."""
    from transformers import AutoTokenizer

    from schemas.errors import InputError

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
        from trainer.model import resolve_text_model

        return cls(load_tokenizer(resolve_text_model(text_model)), max_tokens)

    def __call__(self, text: str, rng: np.random.Generator | None = None) -> list[int]:
        """Token ids with [CLS]/[SEP]; `rng` given = training augmentation."""
        return self.many([text], [rng])[0]

    def many(self, texts: list[str], rngs: list[np.random.Generator | None]) -> list[list[int]]:
        """`self(text, rng)` for each pair, in one tokenizer call: its overhead per call is most of what a
        short caption costs."""
        if self.backend is not None:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            return [self._augmented(e.ids, e.word_ids, rng) for e, rng in zip(encodings, rngs, strict=True)]
        encodings = self.tokenizer(texts, add_special_tokens=False)
        return [
            self._augmented(encodings["input_ids"][i], encodings.word_ids(i), rng)
            for i, rng in enumerate(rngs)
        ]

    def _augmented(self, pieces: list[int], words: list[int | None], rng: np.random.Generator | None):
        pieces_by_word = [
            [i for i, _ in group]
            for _, group in groupby(zip(pieces, words, strict=True), key=lambda pair: pair[1])
        ]
        ids: list[int] = []
        for pieces in pieces_by_word:
            if rng is not None and (draw := rng.random()) < ALTER_PROB:
                draw /= ALTER_PROB
                if draw < MASK_SHARE:
                    ids += [self.mask] * len(pieces)
                elif draw < MASK_SHARE + RANDOM_SHARE:
                    ids += rng.integers(0, self.vocab_size, len(pieces)).tolist()
                continue  # else: deleted
            ids += pieces
        if self.max_tokens is not None:
            ids = ids[: self.max_tokens - 2]
        return [self.cls, *ids, self.sep]
