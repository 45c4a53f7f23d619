"""Data-parallel training on PyTorch's own engine: torch.distributed + DistributedDataParallel.

Processes are started by torchrun (or `cnnkit train --devices N`, which calls torchrun's launcher), which
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; the same command then works on one machine and on
a cluster. cnnkit adds only what is its own: reducing validation figures over the whole split, and which
rank writes files (rank 0). How an epoch is cut into per-rank batches is the data layer's
(data.tensors.batch_indices).

Batch size is per process, as in DDP itself: N processes step on N x --batch-size images at a time.
`--scale-lr` applies the linear scaling rule (Goyal et al., 2017: "when the minibatch size is multiplied
by k, multiply the learning rate by k", with warm-up) to the peak learning rate.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

if torch.distributed.is_available():
    # Before any process group exists (see release_pinned_group): DistributedDataParallel imports this module, whose
    # functions take `group=group.WORLD` as default arguments, bound when the module is first imported.
    import torch.distributed.nn.functional  # noqa: F401

from cnnkit.errors import CnnkitError
from cnnkit.lifetime import die_with_parent, keep_until_exit


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """The World torchrun describes in the environment, or a single process when not launched by it."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise CnnkitError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None


def current_world() -> World:
    """The World of the initialised process group, else a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)))
    return World()


def init_distributed(device: str = "auto") -> World:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); a no-op for one process."""
    world = launched_world()
    if not world.distributed or torch.distributed.is_initialized():
        return current_world() if world.distributed else world
    # torchrun starts each worker in a session of its own, so a kill -9 of the launcher would leave them
    # training on (measured: rank 0 finished and wrote the run after its launcher was killed).
    die_with_parent(signal.SIGKILL)
    if not torch.distributed.is_available():
        raise CnnkitError("this PyTorch build has no torch.distributed; train with one process")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return current_world()


#: What gloo (and NCCL) say in a collective when another process of the group has died.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited")


@contextlib.contextmanager
def peers_watched(world: World) -> Iterator[None]:
    """A collective that fails because another process of the run died (killed; the kernel's out-of-memory killer)
    raises a RuntimeError from deep in gloo: here it is a CnnkitError saying so, which the run directory's keeper
    then completes with the checkpoint to resume from, in one line instead of a traceback."""
    try:
        yield
    except RuntimeError as error:
        if not world.distributed or not any(sign in str(error) for sign in PEER_GONE):
            raise
        raise CnnkitError("another training process of this run ended without a word (killed, perhaps for "
                          "memory)") from error


def abandon_distributed(error: BaseException) -> None:
    """Leave the process group after `error`: no barrier (the other processes may never reach it), and nothing of the
    group freed before the process ends (lifetime.keep_until_exit: `error`'s traceback holds the model). A script
    of the Python API that goes on after such a failure keeps that model in memory."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        keep_until_exit(error)


def shutdown_distributed() -> None:
    """Leave the process group after a barrier (no rank leaves while another still needs it), then destroy it here,
    its threads joined, so none of them is still at work when the interpreter exits, once nothing else (a
    DistributedDataParallel wrapper still referenced) holds it: release_pinned_group. After a failure,
    abandon_distributed instead."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        release_pinned_group(torch.distributed.group.WORLD)
        torch.distributed.destroy_process_group()


def release_pinned_group(group: object) -> None:
    """Drop the references that torch.distributed.nn.functional's default arguments hold to `group`.

    Imported after init_process_group (DistributedDataParallel imports it), that module binds the world group as the
    default of ten functions, so destroy_process_group() no longer destroys the group: its gloo worker threads
    outlive it, and one still releasing its last collective's tensors as Python shuts down takes the GIL and aborts
    the process ("terminate called without an active exception", SIGABRT; measured: 9 of 10 two-rank launches that
    leave with collectives in flight, 0 of 10 through shutdown_distributed). This module imports it first, so its
    defaults are None; a script that joined the group before importing cnnkit gets them reset here.
    """
    functional = sys.modules.get("torch.distributed.nn.functional")
    if functional is None or group is None:
        return
    for function in vars(functional).values():
        defaults = getattr(function, "__defaults__", None)
        if defaults and any(value is group for value in defaults):
            function.__defaults__ = tuple(None if value is group else value for value in defaults)


def process_device(device: torch.device, world: World) -> torch.device:
    """Each process of a CUDA job takes the GPU of its local rank."""
    if world.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def wrap_model(model: nn.Module, device: torch.device, world: World, sync_batchnorm: bool = False,
               parameters_rest: bool = False) -> nn.Module:
    """The module the train step calls: DDP around `model` when distributed (gradients averaged over
    ranks during backward), else the model itself. `parameters_rest`: some parameters that train now will
    sit out some steps (the backbone during --freeze-epochs); DDP then looks each step for those that get no
    gradient instead of waiting for them, which it would otherwise do until it fails."""
    if not world.distributed:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise CnnkitError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=parameters_rest)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed of its own for each (run seed, rank, epoch): the draws of augmentation (and dropout) on
    each rank, re-seeded every epoch, so a resumed multi-process run needs no per-rank RNG state."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63 - 1)


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) of `model`."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum `values` over ranks (in place and returned); unchanged for one process."""
    if world.distributed:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor, world: World) -> torch.Tensor:
    """The minimum of `values` over ranks (in place and returned); unchanged for one process."""
    if world.distributed:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MIN)
    return values


def all_gather(value: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's `value` (all of one shape), in rank order; [value] for one process."""
    if not world.distributed:
        return [value]
    gathered = [torch.empty_like(value) for _ in range(world.world_size)]
    torch.distributed.all_gather(gathered, value)
    return gathered


def barrier(world: World) -> None:
    """Wait until every rank is here; nothing to wait for in one process."""
    if world.distributed:
        torch.distributed.barrier()


def rank0_flag(flag: bool, world: World) -> bool:
    """Rank 0's `flag`, on every rank of the process group (a tensor broadcast: no pickling)."""
    if not world.distributed:
        return flag
    on_gpu = torch.distributed.get_backend() == "nccl"
    value = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())
