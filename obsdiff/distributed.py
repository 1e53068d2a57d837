"""Scale-out over processes: calibration prompts split by rank, Hessian sums all-reduced.

Launched with ``torchrun --nproc-per-node N python -m pipeline prune ...`` (env ``RANK``/``WORLD_SIZE``),
each rank calibrates its share of the prompts; Hessians are sums, so an all-reduce of the sums and weighted
counts gives exactly the single-process Hessian (up to float summation order). Solving is spread over the
ranks too (job ``j`` on rank ``j % world``) and the results broadcast, so every rank holds the same pruned
weights for the next package. Rank 0 writes the files. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world`` (1 = no scale-out); ``device`` for collectives."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[tuple[int, Any]]:
        """This rank's ``(global_index, item)`` pairs: items ``rank, rank + world, ...``."""
        return [(i, items[i]) for i in range(self.rank, len(items), self.world)]

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> None:
        """In-place sum over ranks (tensors on the collective device are reduced where they are)."""
        if not self.active:
            return
        for t in tensors:
            if t.device == self.device:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            else:
                buf = t.to(self.device)
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                t.copy_(buf)

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """In-place broadcast of ``tensor`` from rank ``src``."""
        if not self.active:
            return
        buf = tensor if tensor.device == self.device else tensor.to(self.device)
        if buf.dtype == torch.bfloat16 and self.device.type == "cpu":
            buf = buf.float()  # gloo has no bfloat16
        dist.broadcast(buf, src=src)
        if buf is not tensor:
            tensor.copy_(buf)

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_from_env(device: torch.device | str | None = None) -> DistContext:
    """Join the process group described by ``RANK``/``WORLD_SIZE`` (torchrun), if any.

    device: the compute device; on CUDA each rank uses ``cuda:LOCAL_RANK`` and NCCL, otherwise gloo on CPU.
    Without ``WORLD_SIZE`` > 1 this returns a single-process context and initialises nothing.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if world <= 1:
        return DistContext(0, 1, dev)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    log.info("rank %d of %d on %s (%s)", rank, world, dev, backend)
    return DistContext(rank, world, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
