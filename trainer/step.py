"""One training step, the library's (open_clip keeps its step apart from its loop the same way): where a
run is (`Position`), the recipe's optimizer and learning-rate schedule, the step itself and its finiteness
check. The loop (trainer/train.py) and the benchmarks use these; none keeps a copy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from userpipe.schemas.errors import NonFiniteError
from userpipe.schemas.run import RunConfig
from userpipe.trainer import distributed
from userpipe.trainer.losses import score_signals
from userpipe.trainer.model import USER


@dataclass
class Position:
    epoch: int = 0
    step: int = 0  # batches done in `epoch`
    global_step: int = 0
    best_rsum: float = float("-inf")


def build_optimizer(model: USER, recipe) -> torch.optim.AdamW:
    """The recipe's groups: the text backbone at text_lr_scale x lr, everything else at lr. AdamW runs as one
    fused kernel, several times faster than the default per-tensor loop (bench/train_throughput.py)."""
    backbone = [p for p in model.text.bert.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return torch.optim.AdamW(
        [
            {"params": rest, "lr": recipe.lr, "scale": 1.0},
            {"params": backbone, "lr": recipe.lr * recipe.text_lr_scale, "scale": recipe.text_lr_scale},
        ],
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        fused=True,
    )


def learning_rate(recipe, epoch: int, global_step: int) -> float:
    """Step schedule (x lr_decay from each listed epoch) with optional linear warmup."""
    lr = recipe.lr * recipe.lr_decay ** sum(epoch >= e for e in recipe.lr_decay_epochs)
    if recipe.warmup_steps and global_step < recipe.warmup_steps:
        lr *= (global_step + 1) / recipe.warmup_steps
    return lr


def uto_mu(config: RunConfig, global_step: int) -> float:
    """UTO's μ at a step: model.mu, or on a μ warm-up the linear ramp from train.mu_start to it."""
    recipe, mu = config.train, config.model.mu
    if recipe.mu_start is None or global_step >= recipe.mu_warmup_steps:
        return mu
    return recipe.mu_start + (mu - recipe.mu_start) * global_step / recipe.mu_warmup_steps


def _forward_precision(device: torch.device):
    """A step's forward: bf16 autocast on CUDA (the losses stay fp32), fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _clip(batch, enhancement: str, device: torch.device) -> torch.Tensor | None:
    """The batch's CLIP globals, which only CGE reads."""
    return batch.clip_image.to(device) if enhancement == "cge" else None


@torch.no_grad()
def matching_score(model: USER, batch, device: torch.device) -> float:
    """The mean score of a batch's matching pairs, every rank's rows (the step's `positive_score`), as a
    training step's forward sees them (training mode, each rank's BatchNorm statistics over the global batch);
    the model's buffers (BatchNorm's running statistics) and the RNG (dropout's) are left as they were."""
    saved = [buffer.clone() for buffer in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _forward_precision(device):
        clip = _clip(batch, model.config.enhancement, device)
        images = model.encode_images(batch.regions.to(device), batch.region_lengths.to(device), clip)
        texts = model.encode_texts(batch.tokens.to(device), batch.token_lengths.to(device))
    for buffer, value in zip(model.buffers(), saved, strict=True):
        buffer.copy_(value)
    signals = score_signals(distributed.gather(images), distributed.gather(texts), model.config.gamma)
    return float(signals["positive_score"])


def train_step(
    model: USER, optimizer: torch.optim.Optimizer, batch, config: RunConfig, device, position: Position
) -> dict[str, torch.Tensor]:
    """One optimizer step: forward (bf16 autocast on CUDA; the losses stay fp32), backward, clipping, the
    finiteness check, AdamW. Returns the losses, the model's score signals and the gradient norm before
    clipping."""
    with _forward_precision(device):
        losses = model(
            batch.regions.to(device),
            batch.region_lengths.to(device),
            batch.tokens.to(device),
            batch.token_lengths.to(device),
            batch.image_index.to(device),
            clip=_clip(batch, config.model.enhancement, device),  # `model` may be DDP's wrapper
            backend=config.train.backend,
            mu=uto_mu(config, position.global_step),
        )
    optimizer.zero_grad(set_to_none=True)
    with record_function("backward"):
        losses["loss"].backward()
    with record_function("optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        check_step_finite(losses["loss"], grad_norm, position)
        optimizer.step()
    return {**losses, "grad_norm": grad_norm}


def check_step_finite(loss: torch.Tensor, grad_norm: torch.Tensor, position: Position) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (and every later number)."""
    loss_value, norm_value = loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
        raise NonFiniteError(
            f"step {position.global_step + 1} (epoch {position.epoch + 1}): {what}; the run stopped "
            "without applying it (lower train.lr or raise train.warmup_steps, then --resume "
            "from the last checkpoint)"
        )
