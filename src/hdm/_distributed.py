"""Data-parallel training in plain `torch.distributed`: one process per rank, each reading its own
shard of the images. torchrun or Ray Train starts the processes and the process group; the training
loop (`_train.fit`) and calibration call the collectives here and know nothing of either.

A single process is world 1 and every collective is then the identity, so a one-process fit is the
same program. What is computed from data (feature statistics, the density bank, calibration) is
gathered from every rank, never taken from rank 0's shard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ._data import HDMInputError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """The rank that writes files and speaks."""
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed for its draws: the run's own on rank 0, so world 1 is the one-process fit."""
        return seed + 1_000_003 * self.rank

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous part of `items`: the parts in rank order are `items` in its order, so
        anything gathered in rank order matches the one-process computation."""
        n = len(items)
        return list(items[n * self.rank // self.world:n * (self.rank + 1) // self.world])

    def gather_rows(self, x: torch.Tensor, to: int | None = None) -> torch.Tensor | None:
        """Every rank's `x` (same trailing shape, any number of rows) concatenated in rank order: on
        every rank, or with `to` on that rank only (None elsewhere)."""
        if self.world == 1:
            return x
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
        rows = [int(s) for s in sizes]
        padded = torch.zeros((max(rows), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in range(self.world)] if to in (None, self.rank) else None
        if to is None:
            dist.all_gather(parts, padded)
        else:
            dist.gather(padded, parts, dst=to)
            if parts is None:
                return None
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    def broadcast_(self, tensors: list[torch.Tensor], src: int = 0) -> None:
        """Every rank's `tensors` overwritten in place with rank `src`'s."""
        if self.world > 1:
            for tensor in tensors:
                dist.broadcast(tensor, src)

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Each tensor replaced in place by its mean over the ranks, in one collective."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            tensor.copy_(part.view_as(tensor))

    def average_gradients(self, params: list[torch.nn.Parameter], buffers: list[torch.Tensor] = ()) -> None:
        """What DistributedDataParallel does, for modules the loop calls by more than `forward`: a
        parameter no loss reached on one rank still takes part, with a zero gradient. `buffers`
        (running statistics) are averaged in the same collective."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.average_([p.grad for p in params] + list(buffers))

    def total(self, values: list[float]) -> list[float]:
        """The sums of `values` over the ranks (counts, losses), in float64."""
        if self.world == 1:
            return [float(v) for v in values]
        # NCCL reduces only tensors on the rank's GPU
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        summed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return summed.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` in rank order: small state of this job's own processes (RNG states),
        never user data."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def need(self, count: int, what: str, fix: str) -> None:
        """One line when `count` items cannot give every rank at least one."""
        if count < self.world:
            raise HDMInputError(f"{self.world} workers need at least {self.world} {what}, not {count}; {fix}")


def running_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The batch-norm running means and variances in `module`: each rank sees its own batches, so
    they are averaged over the ranks at every step, which keeps every rank's model the same."""
    return [buffer for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for buffer in (m.running_mean, m.running_var) if buffer is not None]


def channel_statistics(values: torch.Tensor, ranks: Ranks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) standard deviation of B x C x H x W `values` over every rank's
    rows, as 1 x C x 1 x 1: each rank's count, mean and sum of squared deviations, combined in float64
    (Chan et al.), so they match the statistics of all rows in one process up to float rounding."""
    # One channel at a time: the whole cache in float64, transposed, and its squared deviations would
    # each be twice the cache (they made a fit's peak memory).
    mean, m2 = (torch.empty(values.shape[1], dtype=torch.float64, device=values.device) for _ in range(2))
    for c in range(values.shape[1]):
        x = values[:, c].double().flatten()
        mean[c] = x.mean()
        m2[c] = ((x - mean[c]) ** 2).sum()
    count = torch.full_like(mean, values.numel() // values.shape[1])
    parts = ranks.gather_rows(torch.stack([count, mean, m2])[None])
    counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]
    total = counts.sum(0)
    overall = (counts * means).sum(0) / total
    spread = (m2s + counts * (means - overall) ** 2).sum(0)
    std = (spread / (total - 1)).sqrt()
    shape = (1, -1, 1, 1)
    return overall.to(values.dtype).view(shape), std.to(values.dtype).view(shape)


def join_from_env(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join its process group: gloo on CPUs, NCCL
    on CUDA, each rank on its own GPU (LOCAL_RANK). Returns the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device
