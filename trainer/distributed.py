"""Training in several processes started by torchrun, as open_clip and MoCo train: the process group from
torchrun's environment, gathers across ranks, and BatchNorm over the global batch.

One global batch: `train.batch_size` pairs, `batch_size / world` per rank. Every rank gathers the image and
caption embeddings of all ranks (`gather_with_grad`) and computes the same loss over the global batch; the
gradient of a rank's rows flows back to it summed over the ranks' (equal) losses, W times the global loss's,
and DDP's average over the W ranks turns that back into the global loss's gradient, the gradient one
process would compute on the same pairs. Keys and their image ids are gathered without gradient (MoCo's
concat_all_gather), so every rank pushes the same keys in the same order and the queues stay equal.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from userpipe.schemas.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory; the others write nothing."""
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_from_environment() -> World:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK (absent: one process)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise InputError(f"torchrun's environment is unreadable ({exc})") from None
    return World(rank, size, local)


def start(world: World) -> torch.device:
    """Join the process group when there are several processes: NCCL with one GPU per LOCAL_RANK where
    CUDA is, gloo on CPUs. Returns the device this rank trains on."""
    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        if world.local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {world.local_rank} needs GPU {world.local_rank}, this node has "
                f"{torch.cuda.device_count()}: start at most that many processes per node"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.size)
    return device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows (the same count on each), in rank order. Backward: the gradient of this rank's rows,
    summed over every rank's loss (one all-reduce of the gathered gradient: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = len(x)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.narrow(0, dist.get_rank() * ctx.rows, ctx.rows)


class _SumWithGrad(torch.autograd.Function):
    """The sum over ranks; backward: the sum over ranks of the gradient (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _sum(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _sum(grad)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order; gradients flow back to the rank that owns the rows."""
    return _GatherWithGrad.apply(x) if active() else x


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order, without gradient."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _sum(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x)
    return x


class BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are the global batch's when `global_statistics` is set and
    several processes train: the statistics the released single-process code computes over its one batch.
    torch's SyncBatchNorm runs on GPUs only; this is the same computation in plain ops (the mean, then the
    centred second moment, each one all-reduce that keeps gradients), on any device and backend."""

    global_statistics = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.global_statistics and active()):
            return super().forward(x)
        x = x.float()  # statistics in fp32, as autocast runs BatchNorm
        dims = [0, *range(2, x.dim())]  # every axis but the channels (axis 1)
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = _sum(torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device))
        mean = _SumWithGrad.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _SumWithGrad.apply((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1), factor)
        return out


def use_global_batch_statistics(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, BatchNorm1d):
            module.global_statistics = enabled


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0 and its result on every rank; an error it raises is raised on every rank (the
    others would otherwise wait for rank 0 in their next collective)."""
    if not active():
        return compute()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, compute())
        except Exception as exc:  # noqa: BLE001 - passed on to every rank, then raised here too
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0)
    succeeded, value = box[0]
    if not succeeded:
        raise value
    return value


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order; one process: [value]."""
    if not active():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when several processes train (parameters and buffers copied from rank 0 at
    the start); the model itself otherwise. Buffers are not copied again at each step: the queues and
    BatchNorm statistics are updated identically on every rank. A static graph: the text model's pooler is
    built but unused, which DDP then accepts without searching for unused parameters at every step."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, forward_sync_buffers=False, static_graph=True
    )
