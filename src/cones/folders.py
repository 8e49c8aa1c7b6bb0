"""A folder of subject folders: read it, and find each subject's concept, with one process or many.

    subjects/dog/subject.json   {"token": "sks", "class_word": "dog"}
    subjects/dog/1.png ...      the subject's pictures (what `cones find --images` takes)
    subjects/dog/class/*.png    optional class images (what `--class-images` takes; generated otherwise)

`find_each(pipe, read_subject_folders("subjects/"), "concepts/", config)` is `cones find --subjects
subjects/ --out concepts/`: each subject goes through the same `find_concept`, with the same `FindConfig`, as
a single `cones find`, and its concept is written to `concepts/<name>.cones`. Subjects whose file exists are
skipped, so an interrupted run continues where it stopped. Under `torchrun` or `accelerate launch` the
processes share the work (`cones.distributed`): with `mode="subjects"` rank r searches subjects r, r + W, ...
alone; with `mode="batch"` all processes search each subject together, each computing its share of every
step's batch. A subject's `.cones` file is the one a single process writes: byte for byte in the subjects
mode, up to the rounding of the summed gradients in the batch mode.

    torchrun --standalone --nproc_per_node 8 -m cones.cli find --subjects subjects/ --out concepts/ ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.distributed as dist

from cones.config import FindConfig
from cones.distributed import rank_and_size, shard
from cones.find import find_concept
from cones.images import EXTENSIONS, image_files, load_pictures, model_resolution
from cones.search import SearchResult

__all__ = ["FoundConcepts", "SubjectFolder", "find_each", "read_subject_folders"]

SUBJECT_FILE = "subject.json"
CLASS_FOLDER = "class"


@dataclass(frozen=True)
class SubjectFolder:
    """One subject folder: its name, identifier token and class word, and the paths of its images."""

    name: str
    token: str
    class_word: str
    images: tuple[str, ...]
    class_images: tuple[str, ...] = ()


def read_subject_folders(root: str | os.PathLike[str]) -> list[SubjectFolder]:
    """The subjects under `root`, sorted by name: each sub-folder with a `subject.json` file (see above)."""
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
        images = tuple(image_files(folder))
        if not images:
            raise ValueError(f"subject folder {folder!r} holds no images; add {'/'.join(EXTENSIONS)} files.")
        class_folder = os.path.join(folder, CLASS_FOLDER)
        class_images = tuple(image_files(class_folder)) if os.path.isdir(class_folder) else ()
        subjects.append(SubjectFolder(name, spec["token"], spec["class_word"], images, class_images))
    if not subjects:
        raise ValueError(
            f"`subjects` {root!r} has no sub-folder with a {SUBJECT_FILE}; see `read_subject_folders`."
        )
    return subjects


@dataclass(frozen=True)
class FoundConcepts:
    """What `find_each` did, the same on every process."""

    processes: int
    mode: str
    written_by: list[list[str]]  # per rank, the `.cones` files it wrote, in order
    searched: list[dict[str, Any]] = field(default_factory=list)  # name, neurons, sparsity, final_loss
    skipped: int = 0  # subjects whose file existed

    @property
    def written(self) -> list[str]:
        """Every `.cones` file written now, sorted."""
        return sorted(path for paths in self.written_by for path in paths)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values: processes, mode, written, searched."""
        return {
            "processes": self.processes,
            "mode": self.mode,
            "written": self.written,
            "searched": self.searched,
        }


def find_each(
    pipe,
    subjects: Sequence[SubjectFolder],
    out_dir: str | os.PathLike[str],
    config: FindConfig | None = None,
    *,
    mode: Literal["subjects", "batch"] = "subjects",
    cache_dir: str | None = None,
    overwrite: bool = False,
    disable: bool = True,
    on_result: Callable[[SubjectFolder, SearchResult], None] | None = None,
) -> FoundConcepts:
    """Find the concept of each subject with `find_concept` and write `out_dir/<name>.cones`.

    Args:
        pipe: a `StableDiffusionPipeline` (e.g. from `cones.pipeline.load_pipeline`) on this process's device.
        subjects: the subjects, in the same order on every process (e.g. `read_subject_folders(folder)`).
        out_dir: where the `.cones` files go; existing files are kept (the subject is skipped) unless
            `overwrite`.
        config: the settings of every search, as for `cones find`.
        mode: `"subjects"`: each process searches its share of the subjects alone;
            `"batch"`: all processes search every subject together, each computing part of the batch.
        cache_dir: where generated class images are cached (subjects without a `class/` folder).
        overwrite: search subjects whose file exists again and replace the file.
        disable: hide the progress bars (they are shown on rank 0 at most).
        on_result: called with each subject and its `SearchResult` on the process(es) that searched it,
            before the file is written (it may add to `result.concept.metadata`).
    Returns:
        A `FoundConcepts`, gathered from all processes.
    """
    if mode not in ("subjects", "batch"):
        raise ValueError(f"`mode` must be 'subjects' or 'batch', got {mode!r}.")
    rank, world_size = rank_and_size()
    os.makedirs(out_dir, exist_ok=True)
    size = model_resolution(pipe)
    mine = shard(subjects, rank, world_size) if mode == "subjects" else list(subjects)
    written, searched, skipped = [], [], 0
    for subject in mine:
        path = os.path.join(os.fspath(out_dir), f"{subject.name}.cones")
        if os.path.exists(path) and not overwrite:
            skipped += 1
            continue
        result = find_concept(
            pipe,
            load_pictures(subject.images, size),
            token=subject.token,
            class_word=subject.class_word,
            config=config,
            class_pictures=load_pictures(subject.class_images, size) if subject.class_images else None,
            cache_dir=cache_dir,
            disable=disable or rank != 0,
            split_batch=mode == "batch" and world_size > 1,
        )
        if on_result is not None:
            on_result(subject, result)
        if mode == "subjects" or rank == 0:  # in the batch mode every process holds the same result
            result.concept.save(path, overwrite=overwrite)
            written.append(path)
            concept = result.concept
            searched.append(
                {
                    "name": subject.name,
                    "neurons": concept.num_neurons,
                    "sparsity": concept.sparsity,
                    "final_loss": result.losses[-1],
                }
            )
    mine_done = {"written": written, "searched": searched, "skipped": skipped}
    everyone = [mine_done]
    if world_size > 1:
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine_done)
    return FoundConcepts(
        processes=world_size,
        mode=mode,
        written_by=[done["written"] for done in everyone],
        searched=sorted((s for done in everyone for s in done["searched"]), key=lambda s: s["name"]),
        skipped=everyone[0]["skipped"] if mode == "batch" else sum(done["skipped"] for done in everyone),
    )
