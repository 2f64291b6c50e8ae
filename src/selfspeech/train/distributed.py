"""Data-parallel training from the torchrun environment (gloo on CPU, nccl on GPU).

On GPUs each process trains on ``cuda:LOCAL_RANK`` and joins with nccl; on
CPUs the processes join with gloo. The training device decides
(:func:`init_from_env` takes the trainer's ``device``), not whether CUDA merely
exists, so a CPU run on a GPU machine still uses gloo.

``torchrun --nproc_per_node N -m selfspeech.cli pretrain ...`` sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous; every trainer calls
:func:`init_from_env` and the shared loop does the rest:

- the same initial weights on every rank (broadcast from rank 0);
- each rank draws its own share of the epoch's batches (:class:`ShardedBatchSampler`:
  every rank gets the same number of batches, or an all-reduce would hang);
- after each backward the gradients (and the loss, for logging) are averaged
  over ranks with one all-reduce of a flat buffer: DDP's arithmetic. We do not
  wrap the model in ``DistributedDataParallel`` because our steps also call
  sub-modules directly (CTC's frozen-encoder phase, BiRQ's no-grad label pass,
  DINO's teacher), which DDP's forward-hooked reducer does not allow;
- rank 0 alone writes logs, trackers and checkpoints (free of ``module.``
  prefixes, since nothing is wrapped), the others wait at a barrier.

With one process every function here is a no-op, so single-process results are
unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
import torch
import torch.distributed as dist

from selfspeech.accel import resolve_device
from selfspeech.train.sampler import EpochBatchSampler


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> DistEnv:
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size())
    return DistEnv()


def init_from_env(device: str | torch.device | None = "auto") -> DistEnv:
    """Join the process group torchrun describes (idempotent); one process without it.

    ``device``: the trainer's (``auto|cpu|cuda|cuda:N``): nccl with this process's
    GPU (``cuda:LOCAL_RANK``) when it is a GPU, gloo otherwise."""
    if dist.is_available() and dist.is_initialized():
        return current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return current()


def comm_device() -> torch.device:
    """Where small collective tensors live: this process's GPU under nccl, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere."""
    if current().world > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor, weight: float | None = None) -> torch.Tensor:
    """Average gradients over ranks in place (one flat all-reduce); returns the mean loss.

    ``weight``: this rank's share of the combined batch when the loss is a mean over
    unequal counts (e.g. label tokens): gradients and loss are then weighted by it, so
    the result equals one process's mean over the combined batch, not a mean of means.
    """
    world = current().world
    if world == 1:
        return loss.detach()
    # parameters without a gradient this step (a frozen phase) stay without one, as in one process:
    # the same code runs on every rank, so the set is the same everywhere
    params = [p for p in params if p.grad is not None]
    w = 1.0 if weight is None else float(weight)
    flat = torch.cat([p.grad.reshape(-1) * w for p in params]
                     + [loss.detach().reshape(1).to(params[0].grad.device, torch.float32) * w,
                        torch.tensor([w], device=params[0].grad.device)])
    dist.all_reduce(flat)
    flat /= flat[-1].clone()  # the sum of weights (= world when unweighted)
    flat = flat[:-1]
    off = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n
    return flat[-1]


def all_max(x: float) -> float:
    """The largest value over ranks (e.g. elapsed seconds: every rank stops at the same step)."""
    if current().world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def broadcast_flags(*flags: bool) -> tuple[bool, ...]:
    """Rank 0's decisions (improved, stop) on every rank."""
    if current().world == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=comm_device())
    dist.broadcast(t, 0)
    return tuple(bool(v) for v in t.tolist())


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order); identity for one process."""
    world = current().world
    if world == 1:
        return x
    dev = comm_device()
    out = [torch.empty_like(x, device=dev) for _ in range(world)]
    dist.all_gather(out, x.contiguous().to(dev))
    return torch.cat(out).to(x.device)


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


class ShardedBatchSampler(EpochBatchSampler):
    """Rank ``rank``'s share of an inner batch sampler's epochs: batches ``rank, rank + world, ...``.

    The epoch's batch list is cut to a multiple of ``world`` first (at most
    world - 1 batches an epoch are dropped, counted by ``dropped``), so every
    rank runs the same number of steps whatever the length distribution.
    State ``{"epoch", "position"}`` as the inner sampler's.
    """

    def __init__(self, inner, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.inner, self.rank, self.world = inner, rank, world
        self.epoch, self.position = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        full = self.inner.batches(epoch)
        n = len(full) // self.world * self.world
        if n == 0:
            raise ValueError(f"{len(full)} batch(es) an epoch for {self.world} processes: use smaller batches "
                             "or fewer processes")
        return full[:n][self.rank::self.world]

    def dropped(self, epoch: int) -> int:
        return len(self.inner.batches(epoch)) % self.world

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "epoch": self.epoch, "position": self.position, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world", 1) != self.world:
            raise ValueError(f"checkpoint written by {state.get('world', 1)} process(es), resumed with "
                             f"{self.world}: the sampler position would not match; resume with the same count")
        self.inner.load_state_dict({**state, "epoch": 0, "position": 0})
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def shard(sampler):
    """The sampler itself for one process, its rank's :class:`ShardedBatchSampler` otherwise."""
    env = current()
    return sampler if env.world == 1 else ShardedBatchSampler(sampler, env.rank, env.world)
