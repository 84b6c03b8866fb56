"""The released encoders (zhangy0822/USER lib/encoders.py, VSE∞'s GPO) written out plainly from their
formulas, reading the weights of our modules: the yardstick that tests check our encoders against and that
bench/train_throughput.py's plain eager step runs. Modules in train mode apply dropout and batch statistics,
as the released code does; `as_released` gives a model torch's own dropout back.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from userpipe.trainer.model import GPO, Dropout, ImageEncoder, TextEncoder, sinusoid_positions, valid_mask

EPS = 1e-8  # the released l2norm: x / (|x| + eps)


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def as_released(module: torch.nn.Module) -> torch.nn.Module:
    """Every `trainer.model.Dropout` inside `module` replaced by torch's nn.Dropout of the same p."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, torch.nn.Dropout(child.p))
    return module


def released_gpo(gpo: GPO, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """VSE∞'s GPO on a padded batch: a BiGRU over every sample's position encodings gives its weights; the
    features, sorted along the region axis, are weighted and summed."""
    size = features.shape[1]
    mask = valid_mask(lengths, size)
    pes = sinusoid_positions(size, gpo.pe_dim)[None].expand(len(lengths), -1, -1)
    packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, _ = pad_packed_sequence(gpo.gru(packed)[0], batch_first=True, total_length=size)
    half = out.shape[-1] // 2
    scores = gpo.score((out[..., :half] + out[..., half:]) / 2).squeeze(-1)
    weights = torch.softmax(scores.masked_fill(~mask, -10000) / 0.1, dim=1)
    ordered = features.masked_fill(~mask[..., None], -10000).sort(dim=1, descending=True).values
    return (ordered.masked_fill(~mask[..., None], 0) * weights[..., None]).sum(1)


def released_image_encoder(encoder: ImageEncoder, regions: torch.Tensor) -> torch.Tensor:
    """EncoderImageAggr for full-length BUTD regions (B, K, D): SGE at the region width, fc + MLP, GPO."""
    sge = encoder.sge
    local = sge.dropout(torch.tanh(sge.local_norm(sge.local(regions))))
    glob = sge.dropout(torch.tanh(sge.glob_norm(sge.glob(regions.mean(1)))))
    weights = torch.softmax(sge.attend(local * glob[:, None, :]).squeeze(2), dim=1)
    guide = l2norm((weights[..., None] * regions).sum(1))
    beta = l2norm(torch.softmax(torch.einsum("bd,bkd->bk", guide, regions), dim=1))  # λ_att = 1
    enhanced = regions + beta[..., None] * guide[:, None, :]
    b, k, _ = enhanced.shape
    linear1, norm, _, linear2 = encoder.mlp
    hidden = torch.relu(norm(linear1(enhanced).reshape(b * k, -1)))
    features = encoder.fc(enhanced) + linear2(hidden).reshape(b, k, -1)
    return l2norm(released_gpo(encoder.gpo, features, torch.full((b,), k)))


def released_text_encoder(encoder: TextEncoder, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """EncoderText: BERT → Linear → GPO → l2norm."""
    mask = valid_mask(lengths, tokens.shape[1])
    hidden = encoder.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    return l2norm(released_gpo(encoder.gpo, encoder.linear(hidden), lengths))


def released_caption_ids(tokenizer, text: str, rng) -> list[int]:
    """The released training caption (VSE∞ lib/datasets/image_caption.py, process_caption, as USER uses it),
    on our tokenizer's word pieces: a draw from Python's `random` per word as the caption is read; 20% of
    words are altered: half to [MASK] pieces, a tenth to random vocabulary pieces, the rest deleted."""
    from itertools import groupby

    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = [tokenizer.cls]
    for _, group in groupby(zip(encoding.ids, encoding.word_ids, strict=True), key=lambda piece: piece[1]):
        pieces = [piece for piece, _ in group]
        prob = rng.random()
        if prob < 0.2:
            prob /= 0.2
            if prob < 0.5:
                ids += [tokenizer.mask] * len(pieces)
            elif prob < 0.6:
                ids += [rng.randrange(tokenizer.vocab_size) for _ in pieces]
            continue
        ids += pieces
    return [*ids, tokenizer.sep]
