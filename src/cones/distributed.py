"""Many processes, one search: the global batch of each step split across them.

Every process builds the same `ConceptObjective` (same images, same seed), so every process draws the same
global batch of step k. `DistributedObjective` makes each process compute only its rows of that batch (row r,
r + W, r + 2W, ... for rank r of W), weighted so that the sum over processes of the local losses is exactly
L_con; the search's `gradient_hook` then sums the gradients over processes (`allreduce_gradients`). Every
process therefore takes the same search step as a single process with the whole batch, and ends with the
same concept:

    rank, world_size = init_distributed()                      # from torchrun / accelerate launch
    objective = ConceptObjective.from_pipeline(pipe, images, token="sks", class_word="dog", ...)
    result = find_concept_neurons(
        DistributedObjective(objective), pipe.unet, sparsity=0.0132,
        gradient_hook=allreduce_gradients, disable=rank != 0,
        checkpoint_path=rank_checkpoint_path("dog.search.safetensors"),
    )

`find_concept(..., split_batch=True)` does this for a subject's pictures. The loss each process reports is the
global L_con (one scalar all-reduce per step), so the loss history, the non-finite guard and any `callback`
agree across processes. Checkpoints: rank 0 writes the given path; `rank_checkpoint_path` gives each other rank
a private copy of rank 0's file, so a resumed search starts every process from the same step (the path must be
on a file system all processes see). In float16 with loss scaling (`cones.dtypes.LossScaled`), wrap the
distributed objective and sum before unscaling, `gradient_hook=lambda g: scaled.unscale(allreduce_gradients(g))`,
so that an overflow on any process stops every process.

Many subjects shared out among processes (`cones find --subjects DIR`) are `cones.folders.find_each`.
`rank_and_size()` and `shard` are the process-group helpers both use. On a CPU-only machine
`accelerate launch --multi_gpu --num_processes 2` starts two processes (through torchrun; the processes then
use the gloo backend), whereas `accelerate launch --cpu --num_processes 2` starts only one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import torch
import torch.distributed as dist

from cones.objective import ConceptObjective

__all__ = [
    "DistributedObjective",
    "allreduce_gradients",
    "init_distributed",
    "local_rows",
    "rank_and_size",
    "rank_checkpoint_path",
    "rows_loss",
    "shard",
]


# -- the process group ---------------------------------------------------------------------------------


def rank_and_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, size) of this process in the process group when there is one, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the process group that `torchrun` / `accelerate launch` describe in the environment.

    With `WORLD_SIZE` unset or 1 nothing happens and (0, 1) is returned. The backend is NCCL for a CUDA
    `device` (default: `cuda:LOCAL_RANK` when CUDA is available), which becomes this process's current
    device, and gloo otherwise. Returns (rank, world size).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))  # NCCL collectives run on the current device
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank_and_size()


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Rank `rank`'s share of `items`: items rank, rank + world_size, ... (an even, order-keeping split)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` {rank} is outside [0, {world_size}); pass 0 <= rank < world_size.")
    return list(items[rank::world_size])


# -- one search across processes -----------------------------------------------------------------------


def local_rows(num_rows: int, rank: int, world_size: int) -> torch.Tensor:
    """(n,) int64 indices of the rows of a global batch that rank `rank` computes: rank, rank + W, ..."""
    if num_rows < world_size:
        raise ValueError(
            f"each step has {num_rows} rows for `world_size` {world_size} processes; raise the objective's "
            f"`batch_size` to at least {-(-world_size // 2)} with class images, {world_size} without."
        )
    return torch.arange(rank, num_rows, world_size)


def rows_loss(objective: ConceptObjective, step: int, rows: torch.Tensor) -> torch.Tensor:
    """The part of `objective.loss(step)` that comes from the batch rows `rows`.

    L_con = mean over subject rows + λ · mean over class rows, so row i contributes w_i · ℓ_i with
    w_i = 1/(subject rows) or λ/(class rows); summed over a partition of the rows, these parts give
    `objective.loss(step)` (up to rounding). Same draw and per-row loss as `ConceptObjective.loss`.
    """
    batch = objective.draw(step)
    n, b = len(batch.latents), batch.num_subject
    weights = torch.full((n,), 1.0 / b, dtype=torch.float64)  # (rows,)
    if n > b:
        weights[b:] = objective.config.prior_weight / (n - b)
    per_row = objective.row_losses(batch, rows)  # (r,)
    return (per_row * weights[rows].to(per_row.device, per_row.dtype)).sum()


class DistributedObjective:
    """This process's share of a `ConceptObjective`'s global batch (see the module docstring).

    `loss(step)` has the value of the global L_con (the local parts are summed over processes) and the
    gradient of this process's part only; with `allreduce_gradients` as the search's `gradient_hook`, the
    search sees the gradient of the global L_con on every process.
    """

    def __init__(self, objective: ConceptObjective, group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(objective, ConceptObjective):
            raise ValueError(
                f"`objective` is a {type(objective).__name__}; DistributedObjective splits the batch of a "
                "ConceptObjective, so build one with ConceptObjective.from_pipeline."
            )
        self.objective = objective
        self.group = group
        self.rank, self.world_size = rank_and_size(group)
        self.token = objective.token
        self.class_word = objective.class_word
        rows = objective.config.batch_size * (1 if objective.class_latents is None else 2)
        self.rows = local_rows(rows, self.rank, self.world_size)  # (n,)

    def describe(self) -> dict:
        """The whole objective's description: the global loss does not depend on the number of processes."""
        return self.objective.describe()

    def loss(self, step: int) -> torch.Tensor:
        """The global L_con at `step` as value; the gradient of this process's rows."""
        local = rows_loss(self.objective, step, self.rows)
        if self.world_size == 1:
            return local
        total = local.detach().clone()
        dist.all_reduce(total, group=self.group)
        return local + (total - local.detach())  # value: Σ over processes; gradient: this process's part


def allreduce_gradients(
    grads: list[torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """The sum over processes of each gradient, in float32 (float64 stays float64), as one all-reduce.

    Without a process group the gradients are only cast. Use as `find_concept_neurons(gradient_hook=...)`.
    """
    if not grads:
        return []
    dtype = torch.promote_types(grads[0].dtype, torch.float32)
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])  # (all target weights,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, group=group)
    return [part.view(g.shape) for part, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]


def rank_checkpoint_path(path: str | os.PathLike[str], group: dist.ProcessGroup | None = None) -> str:
    """The checkpoint path of this process: `path` on rank 0, a fresh copy of it on the other ranks.

    All processes must call it before the search. Rank 0's file is the checkpoint; the other ranks resume
    from a copy of it taken now (their own writes go to the copy and are never read by anyone else).
    """
    path = os.fspath(path)
    rank, world_size = rank_and_size(group)
    if world_size > 1:
        dist.barrier(group=group)  # rank 0 has finished writing (e.g. the end of an earlier search)
    if rank == 0:
        mine = path
    else:
        mine = f"{path}.rank{rank}"
        if os.path.exists(path):
            shutil.copyfile(path, mine)
        elif os.path.exists(mine):
            os.remove(mine)
    if world_size > 1:
        dist.barrier(group=group)  # every copy is taken before rank 0 writes again
    return mine
