"""Many processes: the shared-batch search equals the one-process search; subjects shared out equal too.

The two-process tests start real processes (torchrun, accelerate launch) on the CPU with the gloo backend
and compare their concepts with a one-process run of the same global batch: in float64 the scores agree to
rounding and the indices exactly; the `.cones` files of the subjects mode are byte for byte the same.
This file is also the worker script those processes run (`python tests/test_distributed.py WORKDIR MODEL`,
or `python tests/test_distributed.py folder SUBJECTS OUT MODEL` for a folder of subjects in the batch mode).
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cones.config import FindConfig
from cones.distributed import (
    DistributedObjective,
    allreduce_gradients,
    local_rows,
    rank_checkpoint_path,
    rows_loss,
    shard,
)
from cones.folders import SubjectFolder, find_each, read_subject_folders
from cones.images import load_pictures, to_tensor
from cones.neurons import ConceptNeurons
from cones.objective import ConceptObjective, ObjectiveConfig, SumObjective
from cones.pipeline import ModelError, load_pipeline
from cones.search import find_concept_neurons, select_neurons

TESTS = os.path.dirname(os.path.abspath(__file__))
SHARED_STEPS = 8
RESUME_STEPS = (3, 6)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def objective(pipe, batch_size: int = 2, class_images: bool = True) -> ConceptObjective:
    return ConceptObjective.from_pipeline(
        pipe,
        images(3, 1),
        token="sks",
        class_word="dog",
        class_images=images(4, 2) if class_images else None,
        config=ObjectiveConfig(batch_size=batch_size, seed=0),
    )


def write_subjects(root: str) -> str:
    """Three subject folders of random 20x24 PNGs (resized and cropped to 16x16), one with class images."""
    rng = np.random.default_rng(0)
    for i, (name, token, word) in enumerate(
        [("cat", "xqz", "cat"), ("dog", "sks", "dog"), ("mug", "sks", "mug")]
    ):
        folder = os.path.join(root, name)
        os.makedirs(os.path.join(folder, "class"))
        with open(os.path.join(folder, "subject.json"), "w") as f:
            json.dump({"token": token, "class_word": word}, f)
        for j in range(2 + i):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{j}.png"))
        if name == "dog":
            for j in range(3):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    os.path.join(folder, "class", f"{j}.png")
                )
    return root


def search_kwargs(steps: int) -> dict:
    return {"steps": steps, "sparsity": 0.02, "disable": True}


def folder_config(steps: int, **changes) -> FindConfig:
    """What `cones find --subjects` searches each subject with: a few steps and class images."""
    return FindConfig(steps=steps, sparsity=0.02, num_class_images=4, **changes)


# ---------------------------------------------------------------------------------------------------
# One process


def test_rows_partition_the_loss(tiny_pipe):
    tiny_pipe.to(torch.float64)
    obj = objective(tiny_pipe, batch_size=3)
    for step in (0, 5):
        with torch.no_grad():
            full = obj.loss(step)
            assert rows_loss(obj, step, torch.arange(6)).item() == pytest.approx(full.item(), rel=1e-12)
            for world_size in (2, 3, 6):
                parts = [rows_loss(obj, step, local_rows(6, r, world_size)) for r in range(world_size)]
                assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)


def test_rows_partition_the_loss_without_class_images(tiny_pipe):
    tiny_pipe.to(torch.float64)
    obj = objective(tiny_pipe, batch_size=2, class_images=False)
    with torch.no_grad():
        parts = [rows_loss(obj, 1, local_rows(2, r, 2)) for r in range(2)]
        assert sum(p.item() for p in parts) == pytest.approx(obj.loss(1).item(), rel=1e-12)


def test_local_rows_and_shard():
    assert local_rows(5, 1, 2).tolist() == [1, 3]
    assert shard(["a", "b", "c", "d", "e"], 0, 2) == ["a", "c", "e"]
    assert shard(["a"], 1, 2) == []
    with pytest.raises(
        ValueError,
        match="4 rows for `world_size` 8 processes; raise the objective's `batch_size` to at least 4",
    ):
        local_rows(4, 0, 8)
    with pytest.raises(ValueError, match="`rank` 2 is outside"):
        shard([1, 2], 2, 2)


def test_one_process_is_the_plain_search(tiny_pipe):
    tiny_pipe.to(torch.float64)
    plain = find_concept_neurons(objective(tiny_pipe), tiny_pipe.unet, **search_kwargs(4))
    wrapped = DistributedObjective(objective(tiny_pipe))
    shared = find_concept_neurons(
        wrapped, tiny_pipe.unet, gradient_hook=allreduce_gradients, **search_kwargs(4)
    )
    assert shared.concept == plain.concept
    np.testing.assert_allclose(shared.losses, plain.losses, rtol=1e-12)
    for name, s in plain.scores.items():
        torch.testing.assert_close(shared.scores[name], s, rtol=1e-9, atol=1e-12)


def test_distributed_objective_wants_a_concept_objective(tiny_pipe):
    with pytest.raises(
        ValueError, match="`objective` is a SumObjective; DistributedObjective splits the batch"
    ):
        DistributedObjective(SumObjective([objective(tiny_pipe)]))


def test_allreduce_gradients_without_a_group_casts_only():
    grads = [torch.ones(2, 3, dtype=torch.float16), torch.arange(4.0, dtype=torch.bfloat16)]
    out = allreduce_gradients(grads)
    assert [g.dtype for g in out] == [torch.float32] * 2 and [g.shape for g in out] == [(2, 3), (4,)]
    assert torch.equal(out[1], torch.arange(4.0))
    assert allreduce_gradients([]) == []


def test_rank_checkpoint_path_in_one_process(tmp_path):
    assert rank_checkpoint_path(tmp_path / "search.safetensors") == str(tmp_path / "search.safetensors")


def test_read_subjects_and_images(tmp_path):
    subjects = read_subject_folders(write_subjects(str(tmp_path)))
    assert [s.name for s in subjects] == ["cat", "dog", "mug"]
    assert subjects[1] == SubjectFolder(
        "dog",
        "sks",
        "dog",
        subjects[1].images,
        tuple(str(tmp_path / "dog" / "class" / f"{j}.png") for j in range(3)),
    )
    assert len(subjects[2].images) == 4 and subjects[0].class_images == ()
    x = to_tensor(load_pictures(subjects[0].images, 16))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_read_subjects_errors(tmp_path):
    with pytest.raises(ValueError, match="`subjects` .* is not a folder"):
        read_subject_folders(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no sub-folder with a subject.json"):
        read_subject_folders(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "subject.json").write_text(json.dumps({"token": "sks"}))
    with pytest.raises(ValueError, match=r"must hold \{\"token\": ..., \"class_word\": ...\} strings"):
        read_subject_folders(str(tmp_path))
    (tmp_path / "a" / "subject.json").write_text(json.dumps({"token": "sks", "class_word": "dog"}))
    with pytest.raises(ValueError, match="holds no images"):
        read_subject_folders(str(tmp_path))


def test_subject_concepts_in_one_process(tiny_pipe_path, tmp_path):
    pipe = load_pipeline(tiny_pipe_path)
    subjects = read_subject_folders(write_subjects(str(tmp_path / "subjects")))
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    written = find_each(pipe, subjects[:2], out, folder_config(2, seed=0), cache_dir=cache).written
    assert written == [os.path.join(out, "cat.cones"), os.path.join(out, "dog.cones")]
    dog = ConceptNeurons.load(written[1])
    assert (dog.token, dog.class_word) == ("sks", "dog") and dog.num_neurons == round(0.02 * 5120)
    # Existing files are kept, so an interrupted run continues where it stopped.
    assert find_each(pipe, subjects, out, folder_config(2), cache_dir=cache).written == [
        os.path.join(out, "mug.cones")
    ]
    with pytest.raises(ValueError, match="`mode` must be 'subjects' or 'batch'"):
        find_each(pipe, subjects, out, folder_config(2), mode="ranks")


def test_float16_subject_concepts_are_loss_scaled(tiny_pipe_path, tmp_path, monkeypatch):
    from cones.dtypes import LossScaled

    seen = []  # scales the gradients were divided by: the search's hook went through LossScaled
    unscale = LossScaled.unscale
    monkeypatch.setattr(
        LossScaled, "unscale", lambda self, grads: seen.append(self.scale) or unscale(self, grads)
    )
    subjects = read_subject_folders(write_subjects(str(tmp_path / "subjects")))[:1]
    half = load_pipeline(tiny_pipe_path, dtype=torch.float16)
    find_each(half, subjects, str(tmp_path / "a"), folder_config(2))
    assert seen == [1024.0, 1024.0]
    find_each(half, subjects, str(tmp_path / "b"), folder_config(2, loss_scale=1.0))
    find_each(load_pipeline(tiny_pipe_path), subjects, str(tmp_path / "c"), folder_config(2))
    assert seen == [1024.0, 1024.0]  # none asked for, and none for float32


def test_report_of_a_folder_in_one_process(tiny_pipe_path, tmp_path, monkeypatch):
    # What `cones find --subjects` prints: the report, JSON-ready, the same on every process.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    subjects = read_subject_folders(write_subjects(str(tmp_path / "subjects")))
    pipe, out, cache = load_pipeline(tiny_pipe_path), str(tmp_path / "out"), str(tmp_path / "cache")
    report = json.loads(
        json.dumps(find_each(pipe, subjects, out, folder_config(2), cache_dir=cache).to_dict())
    )
    assert report["processes"] == 1 and len(report["written"]) == 3
    assert [s["name"] for s in report["searched"]] == ["cat", "dog", "mug"]
    again = find_each(pipe, subjects, out, folder_config(2), cache_dir=cache)
    assert len(again.written) == 0 and again.skipped == 3
    with pytest.raises(ModelError, match="`model`"):
        load_pipeline(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------
# Two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on a timeout the whole group (its workers too) is killed."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args[2]} timed out after {timeout} s: {err[-2000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def worker(workdir: str, model: str) -> None:
    """Run by each of two processes (torchrun): the shared-batch search, the subjects, a resumed search."""
    from cones.distributed import init_distributed

    torch.set_num_threads(1)
    rank, world_size = init_distributed("cpu")
    assert world_size == 2

    # 1. One search, the batch of 4 rows shared: 2 rows each.
    pipe = load_pipeline(model, dtype=torch.float64)
    obj = DistributedObjective(objective(pipe))
    result = find_concept_neurons(
        obj, pipe.unet, gradient_hook=allreduce_gradients, **search_kwargs(SHARED_STEPS)
    )
    save_file(
        {
            **{f"score.{k}": v for k, v in result.scores.items()},
            "losses": torch.tensor(result.losses, dtype=torch.float64),
        },
        os.path.join(workdir, f"shared.rank{rank}.safetensors"),
    )

    # 2. The same search, interrupted after 3 steps and resumed to 6 from rank 0's checkpoint.
    checkpoint = rank_checkpoint_path(os.path.join(workdir, "search.safetensors"))
    kwargs = {"gradient_hook": allreduce_gradients, "checkpoint_path": checkpoint, "checkpoint_every": 1}
    find_concept_neurons(obj, pipe.unet, **kwargs, **search_kwargs(RESUME_STEPS[0]))
    checkpoint = rank_checkpoint_path(os.path.join(workdir, "search.safetensors"))
    resumed = find_concept_neurons(
        obj, pipe.unet, **{**kwargs, "checkpoint_path": checkpoint}, **search_kwargs(RESUME_STEPS[1])
    )
    resumed.concept.save(os.path.join(workdir, f"resumed.rank{rank}.cones"))

    # 3. Subjects shared out: cat and mug on rank 0, dog on rank 1.
    pipe32 = load_pipeline(model)
    subjects = read_subject_folders(os.path.join(workdir, "subjects"))
    cache = os.path.join(workdir, "cache")
    found = find_each(pipe32, subjects, os.path.join(workdir, "two"), folder_config(3), cache_dir=cache)
    with open(os.path.join(workdir, f"written.rank{rank}.json"), "w") as f:
        json.dump(found.written_by[rank], f)
    leave_process_group()


def folder_worker(subjects: str, out: str, model: str) -> None:
    """Run by each of two processes (accelerate launch): a folder of subjects, each searched by both."""
    from cones.distributed import init_distributed

    torch.set_num_threads(1)
    rank, _ = init_distributed("cpu")
    pipe = load_pipeline(model)
    cache = os.path.join(os.path.dirname(out), "cache")
    found = find_each(
        pipe, read_subject_folders(subjects), out, folder_config(3), mode="batch", cache_dir=cache
    )
    if rank == 0:
        print(json.dumps(found.to_dict(), indent=2))
    leave_process_group()


def leave_process_group() -> None:
    """Wait for the other process, then close the group: left to interpreter exit, gloo's threads can be torn
    down while still joinable ("terminate called without an active exception")."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_one_process_concepts(tiny_pipe_path, tmp_path):
    workdir = str(tmp_path)
    subjects = read_subject_folders(write_subjects(os.path.join(workdir, "subjects")))
    launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            workdir,
            tiny_pipe_path,
        ]
    )

    # 1. The shared-batch search: the same scores (to rounding) and losses on both ranks and as one process.
    pipe = load_pipeline(tiny_pipe_path, dtype=torch.float64)
    one = find_concept_neurons(objective(pipe), pipe.unet, **search_kwargs(SHARED_STEPS))
    ranks = [load_file(os.path.join(workdir, f"shared.rank{r}.safetensors")) for r in range(2)]
    for saved in ranks:
        np.testing.assert_allclose(saved["losses"].numpy(), one.losses, rtol=1e-12)
        for name, s in one.scores.items():
            torch.testing.assert_close(saved[f"score.{name}"], s, rtol=1e-9, atol=1e-12)
    mask = select_neurons({name: ranks[0][f"score.{name}"] for name in one.scores}, sparsity=0.02)
    assert all(torch.equal(mask[name], one.concept.mask_for(name)) for name in one.scores)

    # 2. The resumed two-process search is the uninterrupted one-process search.
    six = find_concept_neurons(objective(pipe), pipe.unet, **search_kwargs(RESUME_STEPS[1]))
    for r in range(2):
        resumed = ConceptNeurons.load(os.path.join(workdir, f"resumed.rank{r}.cones"))
        assert resumed.indices.keys() == six.concept.indices.keys()
        assert all(torch.equal(resumed.indices[k], v) for k, v in six.concept.indices.items())

    # 3. Subjects shared out: each file byte for byte what one process writes.
    written = [json.load(open(os.path.join(workdir, f"written.rank{r}.json"))) for r in range(2)]
    assert [[os.path.basename(p) for p in w] for w in written] == [["cat.cones", "mug.cones"], ["dog.cones"]]
    cache = os.path.join(workdir, "cache")
    alone = find_each(
        load_pipeline(tiny_pipe_path),
        subjects,
        os.path.join(workdir, "one"),
        folder_config(3),
        cache_dir=cache,
    ).written
    for path in alone:
        with open(path, "rb") as a, open(os.path.join(workdir, "two", os.path.basename(path)), "rb") as b:
            assert a.read() == b.read(), path


@pytest.mark.slow
def test_accelerate_launch_of_a_folder_in_the_batch_mode(tiny_pipe_path, tmp_path):
    # `--multi_gpu` is how accelerate starts several processes; on a CPU-only machine they use gloo.
    subjects = write_subjects(str(tmp_path / "subjects"))
    proc = launch(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         __file__, "folder", subjects, str(tmp_path / "two"), tiny_pipe_path]
    )  # fmt: skip
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["processes"] == 2 and len(report["written"]) == 3 and len(report["searched"]) == 3
    # One process, the same global batch: float32, so compare by overlap rather than bit for bit.
    pipe, cache = load_pipeline(tiny_pipe_path), str(tmp_path / "cache")
    found = find_each(
        pipe, read_subject_folders(subjects), str(tmp_path / "one"), folder_config(3), cache_dir=cache
    )
    assert len(found.written) == 3
    for name in ("cat", "dog", "mug"):
        one = ConceptNeurons.load(str(tmp_path / "one" / f"{name}.cones"))
        two = ConceptNeurons.load(str(tmp_path / "two" / f"{name}.cones"))
        shared = sum(len(np.intersect1d(one.indices[k], two.indices[k])) for k in one.indices)
        assert shared >= 0.95 * one.num_neurons, (name, shared, one.num_neurons)


if __name__ == "__main__":
    if sys.argv[1] == "folder":
        folder_worker(*sys.argv[2:5])
    else:
        worker(sys.argv[1], sys.argv[2])
