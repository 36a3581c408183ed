"""Beyond one device: data parallelism under torchrun, sharding (FSDP2), activation checkpointing.

    torchrun --nproc_per_node=N train.py ...        N processes ("ranks"), one per GPU (or CPU share)

Data parallelism: every rank holds the whole model and computes the gradient of its own share of
the batch; an all-reduce averages the gradients, so every rank takes the same AdamW step and the
weights stay identical. The global batch of a step is batch_size x grad_accum x ranks windows:
training micro-batch i of rank r is sampler batch i * R + r (see `WindowSampler`), so a step
covers the same windows whatever R is, and 2 ranks reproduce a 1-rank run with the same global
batch and seed (to float rounding). The data position is just the step count: a run can resume
on a different number of ranks as long as the global batch stays the same.

Sharding (`--shard`, FSDP2's `fully_shard`): each rank keeps only 1/R of every weight, gradient
and AdamW moment; a block's full weights are all-gathered just before its forward (and again
for backward) and freed after, and gradients are reduce-scattered. Memory per rank for the model
state falls by R, for some extra communication. Checkpoints gather the full weights on rank 0,
so they are the same ordinary `model.safetensors` as a one-device run's.

Activation checkpointing (`--activation-checkpointing`): backward needs every intermediate
activation of every block; instead of keeping them all, only each block's input is kept and the
block's forward is run again during backward. Activation memory drops to about one block's worth
plus the block inputs, for ~1/3 more compute.

Only rank 0 writes (logs, checkpoints) and prints; every rank takes part in every collective, in
the same order. Backends: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from minigpt2.errors import MiniGPT2Error


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher setting RANK/WORLD_SIZE/LOCAL_RANK) started us."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def world_size_from_env() -> int:
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


@dataclass
class Dist:
    """Where this process stands in the job: rank r of `world_size`, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False  # a process group exists (under torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. tokenizing into the shared cache), then the others
        (who then find the cache filled)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any (e.g. a stop request one rank received)."""
        return bool(self.sum(float(flag))[0]) if self.enabled else flag


def setup(device_name: str = "auto") -> Dist:
    """The process's place in the job, joining the process group when launched by torchrun.

    Under torchrun each rank uses GPU `LOCAL_RANK` (NCCL); without CUDA, the CPU (gloo).
    """
    from minigpt2.device import resolve_device

    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return Dist(device=device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "mps":
        raise MiniGPT2Error("torchrun needs CUDA GPUs or the CPU; Apple MPS has no distributed backend")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MiniGPT2Error(
                f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                "give torchrun --nproc_per_node at most that"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=device, enabled=True)


def rank_prefix() -> str:
    """ "(rank N) " for messages of a rank other than 0 of a torchrun job, else ""."""
    rank = os.environ.get("RANK", "0") if launched_by_torchrun() else "0"
    return "" if rank == "0" else f"(rank {rank}) "


def peer_failure_message(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"another process of this torchrun job failed or was stopped ({first})"


def teardown(*, finished: bool = False) -> None:
    """Leave the process group. `finished`: every rank got here normally, so wait for all of them
    first; a rank that tears down (and exits) while another still has gloo traffic in flight can
    make that one abort at exit ("terminate called without an active exception", seen once on
    the CPU). After a failure there is no such wait: a dead peer would never arrive."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank died or left."""
    if not (dist.is_available() and dist.is_initialized()) or isinstance(error, MiniGPT2Error):
        return False
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()  # what gloo and NCCL say when a peer is gone
    return isinstance(error, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection", "peer", "socket"))


# ----- activation checkpointing ------------------------------------------------------------------


def checkpoint_blocks(model: nn.Module) -> None:
    """Make every transformer block recompute its activations in backward (in place).

    Each block's `forward` is replaced, on the instance, by `torch.utils.checkpoint` around the
    original: the module tree and its parameter names stay exactly the same (no wrapper module,
    so checkpoints and state dicts are unchanged), and `GPT.forward` needs no flag. Non-reentrant
    checkpointing also restores the RNG for dropout, so losses and gradients are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


# ----- wrapping the model ------------------------------------------------------------------------


def wrap_ddp(model: nn.Module, ctx: Dist) -> nn.Module:
    """DistributedDataParallel: gradients all-reduced (averaged) during backward, in buckets that
    overlap with the rest of the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: one unit per block, then the root (embeddings, tied head, final LayerNorm), in place.

    Parameters become DTensors holding this rank's 1/R slice; the module tree and parameter
    names are unchanged.
    """
    from torch.distributed.fsdp import fully_shard

    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    return model


def grad_sync(model: nn.Module, last_micro_step: bool, sharded: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) except on the last micro-step:
    the earlier micro-steps' gradients just add up locally, and one exchange covers them all."""
    if sharded:
        model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's full weights on rank 0 (CPU), empty elsewhere: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(**_FULL))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A sharded model's full optimizer state on rank 0, keyed by parameter name: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full (unsharded) weights and optimizer state into a sharded model: each rank keeps its slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=options)
