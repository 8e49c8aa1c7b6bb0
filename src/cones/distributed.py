"""Many processes: one search shared across them, or many subjects shared out among them.

**One search, the global batch split across processes.** Every process builds the same
`ConceptObjective` (same images, same seed), so every process draws the same global batch of step k.
`DistributedObjective` makes each process compute only its rows of that batch (row r, r + W, r + 2W, ...
for rank r of W), weighted so that the sum over processes of the local losses is exactly L_con; the search's
`gradient_hook` then sums the gradients over processes (`allreduce_gradients`). Every process therefore
takes the same search step as a single process with the whole batch, and ends with the same concept:

    rank, world_size = init_distributed()                      # from torchrun / accelerate launch
    objective = ConceptObjective.from_pipeline(pipe, images, token="sks", class_word="dog", ...)
    result = find_concept_neurons(
        DistributedObjective(objective), pipe.unet, sparsity=0.0132,
        gradient_hook=allreduce_gradients, disable=rank != 0,
        checkpoint_path=rank_checkpoint_path("dog.search.safetensors"),
    )

The loss each process reports is the global L_con (one scalar all-reduce per step), so the loss history,
the non-finite guard and any `callback` agree across processes. Checkpoints: rank 0 writes the given path;
`rank_checkpoint_path` gives each other rank a private copy of rank 0's file, so a resumed search starts
every process from the same step (the path must be on a file system all processes see). In float16 with
loss scaling (`cones.dtypes.LossScaled`), wrap the distributed objective and sum before unscaling,
`gradient_hook=lambda g: scaled.unscale(allreduce_gradients(g))`, so that an overflow on any process stops
every process.

**Many subjects, each process its share.** `find_subject_concepts` takes a list of subjects (a folder of
subject folders, see `read_subjects`); with `mode="subjects"` rank r searches subjects r, r + W, ... alone,
with `mode="batch"` all processes search each subject together as above. A subject's `.cones` file is the
one a single process writes: byte for byte in the subjects mode, up to the rounding of the summed gradients
in the batch mode (the same indices in the tests). Subjects whose file exists are skipped, so an
interrupted run continues where it stopped:

    torchrun --standalone --nproc_per_node 8 -m cones.distributed subjects/ --out concepts/ --model sd15/
    accelerate launch --multi_gpu --num_processes 8 -m cones.distributed subjects/ --out concepts/ ...

On a CPU-only machine `accelerate launch --multi_gpu --num_processes 2` also starts two processes (through
torchrun; the processes then use the gloo backend), whereas `accelerate launch --cpu --num_processes 2`
starts only one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cones.dtypes import loss_scaled
from cones.objective import ConceptObjective, ObjectiveConfig
from cones.search import SearchResult, find_concept_neurons
from cones.targets import Targets

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = [
    "DistributedObjective",
    "Subject",
    "allreduce_gradients",
    "find_subject_concepts",
    "init_distributed",
    "load_images",
    "local_rows",
    "rank_checkpoint_path",
    "read_subjects",
    "rows_loss",
    "shard",
    "world",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SUBJECT_FILE = "subject.json"
CLASS_FOLDER = "class"


# -- the process group ---------------------------------------------------------------------------------


def world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) of this process: from the process group when there is one, else (0, 1)."""
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
    return world()


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
    `objective.loss(step)` (up to rounding). Same draw, noise, targets and float32 reduction as
    `ConceptObjective.loss`.
    """
    batch = objective.draw(step)
    n, b = len(batch.latents), batch.num_subject
    weights = torch.full((n,), 1.0 / b, dtype=torch.float64)  # (rows,)
    if n > b:
        weights[b:] = objective.config.prior_weight / (n - b)
    idx = rows.to(batch.latents.device)
    latents, noise, timesteps = batch.latents[idx], batch.noise[idx], batch.timesteps[idx]  # (r, C, h, w) ...
    noisy = objective.noise_scheduler.add_noise(latents, noise, timesteps)  # (r, C, h, w)
    if objective.prediction_type == "epsilon":
        target = noise
    elif objective.prediction_type == "v_prediction":
        target = objective.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents
    pred = objective.unet(noisy, timesteps, batch.prompt_embeds[idx]).sample  # (r, C, h, w)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    per_row = F.mse_loss(pred.to(dtype), target.to(dtype), reduction="none").flatten(1).mean(1)  # (r,)
    return (per_row * weights[rows].to(per_row.device, dtype)).sum()


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
        self.rank, self.world_size = world(group)
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
    rank, world_size = world(group)
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


# -- many subjects -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One subject folder: its images, identifier token and class word, and optional class images."""

    name: str
    token: str
    class_word: str
    images: tuple[str, ...]
    class_images: tuple[str, ...] = ()


def _image_files(folder: str) -> tuple[str, ...]:
    return tuple(
        os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_SUFFIXES)
    )


def read_subjects(root: str | os.PathLike[str]) -> list[Subject]:
    """The subjects under `root`, sorted by name: each sub-folder with a `subject.json` file.

    root/dog/subject.json   {"token": "sks", "class_word": "dog"}
    root/dog/1.png ...      the subject images
    root/dog/class/*.png    optional class (prior-preservation) images
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"`subjects` {root!r} is not a folder; pass a folder of subject folders.")
    subjects = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        spec_path = os.path.join(folder, SUBJECT_FILE)
        if not os.path.isfile(spec_path):
            continue
        with open(spec_path, encoding="utf-8") as f:
            spec = json.load(f)
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), str) for k in ("token", "class_word")
        ):
            raise ValueError(
                f'`{spec_path}` must hold {{"token": ..., "class_word": ...}} strings, got {spec!r}.'
            )
        images = _image_files(folder)
        if not images:
            raise ValueError(
                f"subject folder {folder!r} holds no images; add {'/'.join(IMAGE_SUFFIXES)} files."
            )
        class_folder = os.path.join(folder, CLASS_FOLDER)
        class_images = _image_files(class_folder) if os.path.isdir(class_folder) else ()
        subjects.append(Subject(name, spec["token"], spec["class_word"], images, class_images))
    if not subjects:
        raise ValueError(f"`subjects` {root!r} has no sub-folder with a {SUBJECT_FILE}; see `read_subjects`.")
    return subjects


def load_images(paths: Sequence[str], size: int) -> torch.Tensor:
    """(n, 3, size, size) float32 in [-1, 1]: each image as RGB, its short side resized to `size`, centre-cropped."""
    import numpy as np
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, size, size)
        out.append(pixels / 127.5 - 1)
    return torch.stack(out)


def find_subject_concepts(
    pipe: StableDiffusionPipeline,
    subjects: Sequence[Subject],
    out_dir: str | os.PathLike[str],
    *,
    mode: Literal["subjects", "batch"] = "subjects",
    config: ObjectiveConfig | None = None,
    steps: int = 1000,
    lr: float = 2e-5,
    threshold: float | None = None,
    sparsity: float | None = None,
    targets: Targets = "cross",
    loss_scale: float | None = None,
    overwrite: bool = False,
    group: dist.ProcessGroup | None = None,
    disable: bool = True,
    on_result: Callable[[Subject, SearchResult], None] | None = None,
) -> list[str]:
    """Search the concept of each subject and write `out_dir/<name>.cones`; return the files this process wrote.

    Args:
        pipe: a `StableDiffusionPipeline` (e.g. from `cones.pipeline.load_pipeline`) on this process's device.
        subjects: the subjects, in the same order on every process (e.g. `read_subjects(folder)`).
        out_dir: where the `.cones` files go; existing files are kept (the subject is skipped) unless
            `overwrite`.
        mode: `"subjects"`: each process searches its share of the subjects alone;
            `"batch"`: all processes search every subject together, each computing part of the batch.
        config: the objective's settings (templates, batch size, λ, seed); the same on every process.
        steps, lr, threshold, sparsity, targets: as in `cones.search.find_concept_neurons` (Algorithm A2).
        loss_scale: as `FindConfig.loss_scale` (None: 1024 for a float16 UNet, else none); the gradients
            are summed over processes, then unscaled.
        overwrite: search subjects whose file exists again and replace the file.
        group: the process group (default: the global one, or none when not distributed).
        disable: hide the progress bars (they are shown on rank 0 at most).
        on_result: called with each subject and its `SearchResult` on the process(es) that searched it.
    """
    if mode not in ("subjects", "batch"):
        raise ValueError(f"`mode` must be 'subjects' or 'batch', got {mode!r}.")
    rank, world_size = world(group)
    os.makedirs(out_dir, exist_ok=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    mine = shard(subjects, rank, world_size) if mode == "subjects" else list(subjects)
    written = []
    for subject in mine:
        path = os.path.join(os.fspath(out_dir), f"{subject.name}.cones")
        if os.path.exists(path) and not overwrite:
            continue
        # 1. The objective: the same images, prompts and seed on every process.
        objective = ConceptObjective.from_pipeline(
            pipe,
            load_images(subject.images, size),
            token=subject.token,
            class_word=subject.class_word,
            class_images=load_images(subject.class_images, size) if subject.class_images else None,
            config=config,
        )
        # 2. The search: alone, or this process's rows with the gradients summed over processes.
        shared = mode == "batch" and world_size > 1
        searched, unscale = loss_scaled(
            DistributedObjective(objective, group) if shared else objective, pipe.unet.dtype, loss_scale
        )
        # Sum the scaled gradients, then unscale: an overflow anywhere stops every process.
        hooks = [lambda g: allreduce_gradients(g, group)] if shared else []
        hooks += [unscale] if unscale else []
        result = find_concept_neurons(
            searched,
            pipe.unet,
            steps=steps,
            lr=lr,
            threshold=threshold,
            sparsity=sparsity,
            targets=targets,
            disable=disable or rank != 0,
            gradient_hook=_chain(hooks),
        )
        if on_result is not None:
            on_result(subject, result)
        # 3. One process writes the file.
        if mode == "subjects" or rank == 0:
            result.concept.save(path, overwrite=overwrite)
            written.append(path)
    if world_size > 1:
        dist.barrier(group=group)
    return written


def _chain(hooks: list[Callable]) -> Callable | None:
    """One gradient hook that applies `hooks` in order (None for none)."""
    if not hooks:
        return None

    def chained(grads):
        for hook in hooks:
            grads = hook(grads)
        return grads

    return chained


# -- python -m cones.distributed ------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cones.distributed",
        description="Find the concept of every subject in a folder, with one or many processes.",
        epilog="example: torchrun --standalone --nproc_per_node 2 -m cones.distributed subjects/ --out concepts/ "
        "--model sd15/ --dtype fp16 --sparsity 0.0132",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("subjects", help="folder of subject folders (subject.json + images, optional class/)")
    p.add_argument("--out", required=True, help="folder for the <subject>.cones files")
    p.add_argument("--model", default=None, help="diffusers folder or .safetensors/.ckpt (default: embedded)")
    p.add_argument(
        "--config", default=None, help="diffusers folder giving the configs of a single-file --model"
    )
    p.add_argument(
        "--mode",
        choices=("subjects", "batch"),
        default="subjects",
        help="share out the subjects, or share each subject's batch",
    )
    p.add_argument("--steps", type=int, default=1000, help="search steps K")
    p.add_argument("--lr", type=float, default=2e-5, help="rate ρ of Adam on ξ")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of candidate weights to select")
    p.add_argument("--threshold", type=float, default=None, help="select M_p > τ instead of --sparsity")
    p.add_argument("--targets", default="cross", help="cross, self or all")
    p.add_argument("--batch-size", type=int, default=2, help="subject images per step (as many class images)")
    p.add_argument("--prior-weight", type=float, default=1.0, help="λ of the prior-preservation term")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, timesteps and noise")
    p.add_argument("--dtype", default="float32", help="weights: float32, float16 or bfloat16")
    p.add_argument("--loss-scale", type=float, default=None,
                   help="scale of the backward pass (default: 1024 for float16, else none)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if CUDA, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="search again subjects whose .cones exists")
    p.add_argument("--format", choices=("text", "json"), default="text", help="summary printed by rank 0")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from cones.dtypes import resolve_dtype
    from cones.pipeline import ModelError, load_pipeline

    args = _parser().parse_args(argv)
    if args.sparsity is None and args.threshold is None:
        args.sparsity = 0.0132
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dtype = resolve_dtype(args.dtype)
        subjects = read_subjects(args.subjects)
        config = ObjectiveConfig(batch_size=args.batch_size, prior_weight=args.prior_weight, seed=args.seed)
        rank, world_size = init_distributed(device)
        pipe = load_pipeline(
            args.model, device, dtype, config=args.config, gradient_checkpointing=args.gradient_checkpointing
        )
        summary = []

        def record(subject: Subject, result: SearchResult) -> None:
            if args.mode == "batch" and rank != 0:
                return  # every process holds the same result
            summary.append(
                {
                    "name": subject.name,
                    "neurons": result.concept.num_neurons,
                    "sparsity": result.concept.sparsity,
                    "final_loss": result.losses[-1],
                }
            )

        written = find_subject_concepts(
            pipe,
            subjects,
            args.out,
            mode=args.mode,
            config=config,
            steps=args.steps,
            lr=args.lr,
            threshold=args.threshold,
            sparsity=args.sparsity,
            targets=args.targets,
            loss_scale=args.loss_scale,
            overwrite=args.overwrite,
            disable=False,
            on_result=record,
        )
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gathered = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(gathered, {"written": written, "summary": summary})
        dist.destroy_process_group()
    else:
        gathered = [{"written": written, "summary": summary}]
    if rank == 0:
        files = sorted(f for g in gathered for f in g["written"])
        if args.format == "json":
            print(
                json.dumps(
                    {
                        "processes": world_size,
                        "mode": args.mode,
                        "written": files,
                        "searched": [s for g in gathered for s in g["summary"]],
                    },
                    indent=2,
                )
            )
        else:
            print(
                f"{len(files)} concepts written to {args.out} by {world_size} process(es); "
                f"{len(subjects) - len(files)} already there"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
