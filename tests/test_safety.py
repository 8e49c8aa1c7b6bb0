"""What hand-made files, races, full disks and careless paths may do to cones, and what they may not.

Each bad input goes through the Python API and the command line: the API raises a cones exception
(`ConesError`) whose message the command line prints as its one line, with exit code 1, and (where a
model is involved) before the model loads. Memory bombs run in a subprocess whose peak memory is measured.
"""

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from cones import files, pipeline
from cones.basemodel import BaseTargets, check_concept, weights_sha256
from cones.cli import main
from cones.errors import (
    ConceptMismatchError,
    ConesError,
    ConesWarning,
    InputError,
    OutputError,
    OutputExistsError,
)
from cones.loaders import load_concept, loaded_concepts, unload_concept
from cones.neurons import ConceptNeurons
from cones.search import SearchError, find_concept_neurons
from cones.storage import ConceptFileError, load_concept_file, save_concept
from cones.targets import parameter_shapes

CORPUS = os.path.join(os.path.dirname(__file__), "data", "bad-concepts")
EXPECTED = json.load(open(os.path.join(CORPUS, "expected.json"), encoding="utf-8"))
MB = 1 << 20


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: everything checked here must be decided before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(pipeline, "load_pipeline", refuse)


def one_line_error(capsys, command):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"cones {command}: error: "
    assert lines[0].startswith(prefix), err
    return lines[0][len(prefix) :]


def random_concept(unet, density=0.1, seed=0, targets="cross", **kw):
    g = torch.Generator().manual_seed(seed)
    mask = {n: torch.rand(s, generator=g) < density for n, s in parameter_shapes(unet, targets).items()}
    params = dict(unet.named_parameters())
    base = weights_sha256({n: params[n] for n in mask})
    return ConceptNeurons.from_mask(
        mask, token="sks", metadata={"search": {"targets": targets}}, base_sha256=base, **kw
    )


# -- the corpus of hand-made files: API and command line, same message ----------------------------------


def test_the_corpus_is_what_its_generator_writes():
    """tests/data/bad-concepts is what make_corpus.py writes, byte for byte, and no file is over 10 KB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(CORPUS, "make_corpus.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = sorted(f for f in os.listdir(CORPUS) if f.endswith(".cones"))
    assert names == sorted(EXPECTED) == sorted(module.CASES) and len(names) >= 12
    for name, (data, message) in module.CASES.items():
        with open(os.path.join(CORPUS, name), "rb") as f:
            assert f.read() == data, name
        assert EXPECTED[name] == message and len(data) < 10_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_one_line_through_api_and_cli(name, tiny_pipe_path, tmp_path, capsys, no_model):
    path = os.path.join(CORPUS, name)
    with pytest.raises(ConceptFileError) as e:
        load_concept_file(path)
    message = str(e.value)
    assert isinstance(e.value, ConesError) and isinstance(e.value, ValueError)
    assert EXPECTED[name] in message and path in message and "\n" not in message and len(message) < 400

    assert main(["inspect", path]) == 1
    assert one_line_error(capsys, "inspect") == message
    out = tmp_path / "out"
    argv = ["generate", "--model", tiny_pipe_path, "--concept", path, "a sks dog", "--out", str(out)]
    assert main(argv) == 1
    assert one_line_error(capsys, "generate") == message
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "device"])
def test_paths_that_are_not_concept_files(kind, tmp_path, capsys):
    path = {"missing": tmp_path / "nope.cones", "folder": tmp_path, "device": "/dev/zero"}.get(kind)
    if kind == "fifo":
        path = tmp_path / "pipe.cones"
        os.mkfifo(path)
    with pytest.raises(ConceptFileError) as e:
        load_concept_file(path)
    message = str(e.value)
    reason = {
        "missing": "it does not exist",
        "folder": "it is a folder, not a file",
        "fifo": "it is not a regular file",
        "device": "it is not a regular file",
    }[kind]
    assert message == f"cannot read {str(path)!r}: {reason}" + message.split(reason)[1]
    assert message.endswith("pass the path of a .cones file")
    assert main(["inspect", str(path)]) == 1
    assert one_line_error(capsys, "inspect") == message
    assert main(["merge", str(path), str(path), "-o", str(tmp_path / "m.cones")]) == 1
    assert one_line_error(capsys, "merge") == message


# -- memory bounded by the file, not by what it claims -------------------------------------------------

# Peak resident memory of this process in bytes. /proc's VmHWM belongs to the process image, whereas
# getrusage's ru_maxrss keeps the parent's peak across fork and exec (pytest's, hundreds of MB), which
# would hide any allocation below it; ru_maxrss is the fallback where there is no /proc.
_PEAK = """
def peak():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""
_MEASURE = (
    _PEAK
    + """
import sys
from cones.storage import ConceptFileError, load_concept_file
base = peak()
try:
    load_concept_file(sys.argv[1])
    print("loaded")
except ConceptFileError as e:
    print("refused:", e)
print(peak() - base)
"""
)


def peak_bytes_above_import(path):
    """(message, peak memory above the import of cones.storage) of `load_concept_file(path)` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    message, peak = done.stdout.strip().splitlines()
    return message, int(peak)


def _header_objects(path):
    """A file declaring a 99 MB header of `{}` objects; only the first MB is written (the rest is sparse)."""
    with open(path, "wb") as f:
        f.write((99 * MB).to_bytes(8, "little") + b"[" + b"{}," * (MB // 3))
        f.truncate(8 + 99 * MB)


def _sparse(path):
    """A 6 GB sparse file that starts like a .cones file."""
    with open(os.path.join(CORPUS, "conv_in.cones"), "rb") as src, open(path, "wb") as f:
        f.write(src.read())
        f.truncate(6 * 1024 * MB)


def _sixteen_mb(path):
    """A 16 MiB file of valid JSON claiming complement-coded parameters, padded with a long string."""
    K = "down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    params = {K.format(i=i): {"shape": [4096, 4096], "count": 2**24 - 1} for i in range(64)}
    info = {
        "format": "cones",
        "format_version": 1,
        "library_version": "0",
        "encoding": "rice",
        "token": None,
        "class_word": None,
        "parameters": params,
        "metadata": {"pad": "x" * (16 * MB - 20_000)},
    }
    text = json.dumps({"__metadata__": {"cones": json.dumps(info)}}).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)


BOMBS = {
    "complement_bomb": (lambda p: None, "implausibly large"),
    "neuron_bomb": (lambda p: None, "implausibly many"),
    "header_objects": (_header_objects, "bytes, more than the"),
    "sparse_6gb": (_sparse, "more than the"),
    "sixteen_mb": (_sixteen_mb, "this reader accepts"),
    "dev_zero": (lambda p: None, "it is not a regular file"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_bombs_are_refused_within_300_mb(bomb, tmp_path):
    make, expected = BOMBS[bomb]
    path = {
        "complement_bomb": os.path.join(CORPUS, "complement_bomb.cones"),
        "neuron_bomb": os.path.join(CORPUS, "neuron_bomb.cones"),
        "dev_zero": "/dev/zero",
    }.get(bomb, str(tmp_path / f"{bomb}.cones"))
    make(path)
    message, peak = peak_bytes_above_import(path)
    assert message.startswith("refused: cannot read") and expected in message
    assert peak < 300 * MB, f"{bomb}: {peak / MB:.0f} MB above the import"


# -- a concept may only shut K/V weights of the model it was found on -----------------------------------


def test_non_kv_parameters_are_refused_through_api(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    rogue = ConceptNeurons(
        {"conv_in.weight": torch.tensor([0, 1])}, {"conv_in.weight": tuple(unet.conv_in.weight.shape)}
    )
    with pytest.raises(
        ConceptMismatchError, match="`conv_in.weight` of the concept is not an attention key/value"
    ):
        load_concept(tiny_pipe, rogue)
    with pytest.raises(ValueError, match="`conv_in.weight` of shape .* is not an attention key/value weight"):
        save_concept(rogue, tmp_path / "rogue.cones")
    assert loaded_concepts(tiny_pipe) == [] and not (tmp_path / "rogue.cones").exists()


def test_an_extra_transformer_block_per_level_is_refused(tiny_pipe):
    concept = random_concept(tiny_pipe.unet)
    deeper = UNet2DConditionModel(**{**tiny_pipe.unet.config, "transformer_layers_per_block": 2})
    with pytest.raises(
        ConceptMismatchError, match=r"has the key/value weight `.*transformer_blocks\.1\.attn2\.to_k"
    ):
        check_concept(concept, BaseTargets.from_unet(deeper))
    # and the other way: a concept of the deeper model on the shallower one
    with pytest.raises(
        ConceptMismatchError, match=r"transformer_blocks\.1\..* is missing from the UNet2DConditionModel"
    ):
        load_concept(tiny_pipe, random_concept(deeper))


def test_other_weights_of_the_same_layout_are_refused_unless_forced(tiny_pipe, tmp_path):
    concept = random_concept(tiny_pipe.unet)
    save_concept(concept, tmp_path / "sks.cones")
    assert load_concept_file(tmp_path / "sks.cones").base_sha256 == concept.base_sha256
    assert list(concept.base_sha256) == ["float16"]
    name = next(iter(concept.shapes))
    original = tiny_pipe.unet.get_parameter(name).detach().clone()
    with torch.no_grad():
        tiny_pipe.unet.get_parameter(name).view(-1)[0] += 1e-3  # a fine-tune, say
    with pytest.raises(
        ConceptMismatchError, match="differ from those the concept .*sks.cones was found on.*--force"
    ):
        load_concept(tiny_pipe, tmp_path / "sks.cones")
    assert loaded_concepts(tiny_pipe) == []
    with pytest.warns(ConesWarning, match="applied anyway"):
        load_concept(tiny_pipe, tmp_path / "sks.cones", force=True)
    assert loaded_concepts(tiny_pipe) == ["sks"]
    unload_concept(tiny_pipe)
    with torch.no_grad():
        tiny_pipe.unet.get_parameter(name).copy_(original)
    load_concept(tiny_pipe, tmp_path / "sks.cones")  # the base weights again: accepted
    # a second concept is checked against the base weights, not against those the first one shut
    load_concept(tiny_pipe, concept, name="again")
    unload_concept(tiny_pipe)
    # the same weights in half precision: the float16 digest matches, no warning; in bfloat16 it cannot be
    # compared, which is a warning, not a silent pass
    half = BaseTargets.from_unet(tiny_pipe.unet.to(torch.float16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_concept(concept, half)
    with pytest.warns(
        ConesWarning, match=r"\['float16'\] weights, which a bfloat16 model cannot be compared"
    ):
        check_concept(concept, BaseTargets.from_unet(tiny_pipe.unet.to(torch.bfloat16)))


def test_generate_decides_about_the_concept_before_the_model_loads(
    tiny_pipe_path, tmp_path, capsys, monkeypatch
):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_path)
    concept = random_concept(pipe.unet)
    concept.base_sha256 = {k: "0" * 64 for k in concept.base_sha256}  # found on other weights
    save_concept(concept, tmp_path / "sks.cones")
    out = tmp_path / "out"
    argv = [
        "generate",
        "--model",
        tiny_pipe_path,
        "--concept",
        str(tmp_path / "sks.cones"),
        "--steps",
        "1",
        "a sks dog",
        "--seeds",
        "0",
        "--out",
        str(out),
    ]
    loads = []
    real = pipeline.load_pipeline
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert main(argv) == 1
    assert "the weights of the UNet of" in one_line_error(capsys, "generate") and loads == []
    assert main([*argv, "--force"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cones generate: warning: the weights of the UNet of")
    assert sorted(os.listdir(out)) == ["grid.png", "prompt0-seed0.png"]


# -- outputs checked before slow work, never half-written ----------------------------------------------


def test_generate_checks_every_name_before_generating(tiny_pipe_path, tmp_path, capsys, no_model):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "grid.png").write_bytes(b"the user's own picture")
    argv = ["generate", "--model", tiny_pipe_path, "a dog", "--seeds", "0", "1", "--out", str(out)]
    assert main(argv) == 1
    assert one_line_error(capsys, "generate") == f"{out / 'grid.png'} exists; pass --overwrite to replace it."
    assert os.listdir(out) == ["grid.png"]


def full_disk_after(monkeypatch, calls):
    """fsync succeeds `calls` times, then the disk is full."""
    real, count = os.fsync, [0]

    def fsync(fd):
        count[0] += 1
        if count[0] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_generate_writes_all_images_or_none(tiny_pipe_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    full_disk_after(monkeypatch, 2)
    argv = [
        "generate",
        "--model",
        tiny_pipe_path,
        "--steps",
        "1",
        "a dog",
        "--seeds",
        "0",
        "1",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 1
    message = one_line_error(capsys, "generate")
    assert message.startswith("no space left on device while writing ") and "prompt0-seed2.png" in message
    assert os.listdir(out) == ["notes.txt"]  # no image, no temporary file


def test_find_checks_the_output_folder_and_the_checkpoint_first(tmp_path, capsys, no_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(photos / f"{i}.png")
    base = ["find", "--images", str(photos), "--token", "sks", "--class-word", "dog"]
    assert main([*base, "--out", str(tmp_path / "nodir" / "x.cones")]) == 1
    assert one_line_error(capsys, "find") == (
        f"the folder {str(tmp_path / 'nodir')!r} of --out {str(tmp_path / 'nodir' / 'x.cones')!r} does not exist; "
        f"create it first (mkdir -p {tmp_path / 'nodir'})"
    )
    garbage = tmp_path / "run.ckpt"
    garbage.write_bytes(b'\x10\0\0\0\0\0\0\0{"not": "json"')
    argv = [*base, "--out", str(tmp_path / "x.cones"), "--checkpoint", str(garbage)]
    assert main(argv) == 1
    message = one_line_error(capsys, "find")
    assert str(garbage) in message and "delete it or pass a new path" in message


class SquaredKV:
    """A loss that depends on every cross-attention K/V weight of `unet`."""

    def __init__(self, unet):
        self.unet = unet

    def loss(self, k):
        return sum((p.float() ** 2).sum() for n, p in self.unet.named_parameters() if ".attn2.to_" in n)


def test_a_garbage_checkpoint_is_one_search_error(tiny_pipe, tmp_path):
    import safetensors.torch

    cases = {
        "garbage.ckpt": b"garbage",
        "other.ckpt": safetensors.torch.save({"x": torch.zeros(2)}, metadata={"foo": "bar"}),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SearchError) as e:
            find_concept_neurons(
                SquaredKV(tiny_pipe.unet),
                tiny_pipe.unet,
                steps=1,
                sparsity=0.1,
                checkpoint_path=path,
                disable=True,
            )
        message = str(e.value)
        assert str(path) in message and "delete it or pass a new path" in message and "\n" not in message
        assert path.read_bytes() == data  # left as it was


def test_two_runs_writing_one_name_exactly_one_wins(tmp_path):
    path = tmp_path / "x.cones"
    outcomes, barrier = [], threading.Barrier(8)

    def write(i):
        barrier.wait()
        try:
            files.write_bytes(path, f"run {i}".encode())
            outcomes.append(("won", i))
        except OutputExistsError as e:
            outcomes.append(("refused", str(e)))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [i for kind, i in outcomes if kind == "won"]
    assert len(won) == 1 and path.read_bytes() == f"run {won[0]}".encode()
    assert all("pass --overwrite to replace it" in m for kind, m in outcomes if kind == "refused")
    assert os.listdir(tmp_path) == ["x.cones"]


def test_a_name_taken_between_check_and_write_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "x.cones"
    real = files.check_outputs

    def check_then_lose_the_race(paths, **kw):
        real(paths, **kw)
        path.write_bytes(b"the other run's concept")

    monkeypatch.setattr(files, "check_outputs", check_then_lose_the_race)
    with pytest.raises(OutputExistsError, match="it appeared while cones was working"):
        files.write_bytes(path, b"mine")
    assert path.read_bytes() == b"the other run's concept" and os.listdir(tmp_path) == ["x.cones"]


@pytest.mark.parametrize("what", ["concept", "checkpoint", "plot"])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(what, tiny_pipe, tmp_path, monkeypatch, capsys):
    concept = random_concept(tiny_pipe.unet)
    save_concept(concept, tmp_path / "c.cones")
    folder = tmp_path / "out"
    folder.mkdir()
    full_disk_after(monkeypatch, 0)
    if what == "concept":
        with pytest.raises(
            OutputError, match=r"^no space left on device while writing .*x\.cones; free some"
        ):
            save_concept(concept, folder / "x.cones")
    elif what == "checkpoint":
        with pytest.raises(OutputError, match=r"^no space left on device while writing .*run\.ckpt"):
            find_concept_neurons(
                SquaredKV(tiny_pipe.unet),
                tiny_pipe.unet,
                steps=1,
                sparsity=0.1,
                checkpoint_path=folder / "run.ckpt",
                disable=True,
            )
    else:
        assert main(["inspect", str(tmp_path / "c.cones"), "--plot", str(folder / "layers.png")]) == 1
        assert one_line_error(capsys, "inspect").startswith("no space left on device while writing")
    assert os.listdir(folder) == []


def test_stale_temporary_files_of_our_naming_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [f".x.cones.cones-tmp-{dead.pid}-0123abcd", f"grid.png.tmp-{dead.pid}.png"]
    alive = f".y.cones.cones-tmp-{os.getppid()}-0123abcd"
    for name in [*stale, alive, "notes.cones-tmp-1.txt"]:
        (tmp_path / name).write_bytes(b"partial")
    files.write_bytes(tmp_path / "new.cones", b"data")
    assert sorted(os.listdir(tmp_path)) == sorted([alive, "notes.cones-tmp-1.txt", "new.cones"])


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_users_umask(umask, tiny_pipe, tmp_path):
    concept = random_concept(tiny_pipe.unet)
    old = os.umask(umask)
    try:
        save_concept(concept, tmp_path / "c.cones")
        files.write_bytes(tmp_path / "run.ckpt", b"x", overwrite=True)
    finally:
        os.umask(old)
    for name in ("c.cones", "run.ckpt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask


def test_errors_are_cones_errors_of_the_usual_builtin_kinds():
    assert issubclass(ConceptFileError, InputError) and issubclass(InputError, ValueError)
    assert issubclass(OutputExistsError, FileExistsError) and issubclass(OutputError, OSError)
    assert issubclass(SearchError, ConesError) and issubclass(SearchError, RuntimeError)
    from cones.cli import UsageError

    assert issubclass(UsageError, ConesError)


# -- reproducible files ---------------------------------------------------------------------------------


def test_the_same_find_twice_gives_the_same_bytes(tiny_pipe_path, tmp_path, capsys):
    import hashlib

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (200, 40 * i, 0)).save(photos / f"{i}.png")
    digests = []
    for name in ("a.cones", "b.cones"):
        argv = [
            "find",
            "--model",
            tiny_pipe_path,
            "--images",
            str(photos),
            "--token",
            "sks",
            "--class-word",
            "dog",
            "--steps",
            "3",
            "--num-class-images",
            "2",
            "--batch-size",
            "1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / name),
            "--format",
            "json",
        ]
        assert main(argv) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["seconds"] >= 0  # the time is reported, not stored
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    concept = load_concept_file(tmp_path / "a.cones")
    assert "search_seconds" not in json.dumps(concept.metadata)
    assert concept.base_sha256 and list(concept.base_sha256) == ["float16"]


def test_peak_memory_measure_is_real():
    """The subprocess measure sees a real allocation (so that the bomb assertions can fail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = (
        _PEAK + "b = peak(); x = bytearray(400 << 20); x[::4096] = b'1' * len(x[::4096]); print(peak() - b)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert int(done.stdout) > 300 * MB


def test_class_images_that_cannot_be_cached_are_a_warning_and_leave_nothing(tmp_path, monkeypatch):
    from cones.find import _store_class_images

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    cache = tmp_path / "cache"
    with pytest.warns(
        ConesWarning, match=r"class images not cached: no space left on device while writing .*0123"
    ):
        _store_class_images([Image.new("RGB", (8, 8))], str(cache / "0123"))
    assert os.listdir(cache) == []
