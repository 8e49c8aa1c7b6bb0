"""Loading a base model: the embedded world model by default, or any Stable Diffusion 1.x / 2.x by path.

Two forms of a model are accepted, both read without network access:

* a diffusers folder (`model_index.json` with `"_class_name": "StableDiffusionPipeline"`), as written by
  `save_pretrained` or found in a Hugging Face snapshot;
* a single original-layout checkpoint (`.safetensors`, or `.ckpt` read with `torch.load(weights_only=True)`,
  which unpickles tensors only and never runs code from the file), as distributed for SD 1.x / 2.x and their
  fine-tunes. It is converted by diffusers' `StableDiffusionPipeline.from_single_file`, which takes the
  tokenizer, scheduler and component configs from a diffusers folder of the same model variant, passed as
  `config` (e.g. a local copy of `stable-diffusion-v1-5/stable-diffusion-v1-5` for a 1.x fine-tune, of
  `stabilityai/stable-diffusion-2-1` for a 768-v 2.x model). An original `v1-inference.yaml` alone is not
  enough offline: diffusers then fetches the CLIP tokenizer and text-encoder configs from the hub.

Other families (SDXL, SD 3, inpainting and upscaling UNets, ...) are refused with a one-line `ModelError`
naming what is supported: the concept-implanting objective drives a 4-channel text-to-image
`UNet2DConditionModel` with one CLIP text encoder.

Loading never writes to the model's folder or file: cones changes weights only in memory, and every change
can be undone bit for bit (see `cones.switching`). Precision and memory options (`dtype`,
`gradient_checkpointing`) are described in `cones.dtypes` and `cones.memory`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from diffusers import StableDiffusionPipeline

from cones.errors import InputError
from cones.registry import default_model

__all__ = ["SUPPORTED", "ModelError", "checkpoint_family", "load_pipeline", "resolve_model"]

SUPPORTED = (
    "Stable Diffusion 1.x and 2.x: a diffusers StableDiffusionPipeline folder, or a single "
    ".safetensors/.ckpt checkpoint with `config` a diffusers folder of the same variant"
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

# model types of `diffusers.loaders.single_file_utils.infer_diffusers_model_type` that cones loads
_SINGLE_FILE_FAMILIES = {"v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x"}
_FAMILY_NAMES = {
    "xl_base": "SDXL",
    "xl_refiner": "the SDXL refiner",
    "xl_inpaint": "SDXL inpainting",
    "playground-v2-5": "Playground v2.5 (SDXL family)",
    "inpainting": "SD 1.x inpainting (9-channel UNet)",
    "inpainting_v2": "SD 2.x inpainting (9-channel UNet)",
    "upscale": "the SD x4 upscaler",
}
_UNET_PREFIX = "model.diffusion_model."
_CROSS_KEY = re.compile(r"model\.diffusion_model\..*attn2\.to_k\.weight$")


class ModelError(InputError):
    """A base model that cannot be loaded; the message says what to pass instead."""


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """The path of `model` (a diffusers folder or a single checkpoint file), or the default model's."""
    if model is None:
        return default_model().model_path
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelError(
            f"`model` {path!r} does not exist; pass a Stable Diffusion folder (diffusers format) or a "
            ".safetensors/.ckpt checkpoint."
        )
    if os.path.isdir(path):
        _check_folder(path)
    elif not path.endswith(SINGLE_FILE_SUFFIXES):
        raise ModelError(
            f"`model` {path!r} is neither a folder nor a {'/'.join(SINGLE_FILE_SUFFIXES)} file; pass a "
            "Stable Diffusion folder (diffusers format) or a single checkpoint."
        )
    return path


def _check_folder(path: str) -> None:
    """Raise `ModelError` unless `path` is a diffusers folder of a `StableDiffusionPipeline`."""
    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        raise ModelError(
            f"`model` {path!r} has no model_index.json; pass the folder of a diffusers Stable Diffusion model."
        )
    try:
        with open(index, encoding="utf-8") as f:
            class_name = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(
            f"`model` {path!r} has an unreadable model_index.json ({e}); re-download it."
        ) from None
    if class_name != "StableDiffusionPipeline":
        raise ModelError(
            f"`model` {path!r} is a {class_name} folder, which cones does not support; it supports {SUPPORTED}."
        )


def load_pipeline(
    model: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    config: str | os.PathLike[str] | None = None,
    gradient_checkpointing: bool = False,
) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` on `device` in `dtype`, with no safety checker and a quiet progress bar.

    Args:
        model: a diffusers folder, a single `.safetensors`/`.ckpt` checkpoint, or None for the embedded
            world model.
        device: where the pipeline lives.
        dtype: the dtype of all weights, or its name (`"fp16"`, `"bf16"`, see `cones.dtypes.resolve_dtype`);
            float16 / bfloat16 halve the memory, and the concept-neuron search keeps its own state in
            float32 whatever this is (see `cones.dtypes`).
        config: for a single checkpoint, a local diffusers folder of the same model variant (tokenizer,
            scheduler and component configs); not used for folders.
        gradient_checkpointing: recompute UNet activations in the backward pass instead of storing them
            (`unet.enable_gradient_checkpointing()`): less memory, about a third more time per step.
    Raises:
        ModelError: a missing path, an unsupported model family, a missing `config`, or a `.ckpt` that
            holds more than tensors.
    """
    from cones.dtypes import resolve_dtype

    path, dtype = resolve_model(model), resolve_dtype(dtype)
    with _quiet_loading():
        pipe = _load(path, config, dtype)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:  # a diffusers older than the `dtype=` argument ignores it
        pipe.to(dtype=dtype)
    return pipe.to(device)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' loading progress bars; a library call prints nothing."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for m in shown:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m in shown:
            m.enable_progress_bar()


def _load(path: str, config: str | os.PathLike[str] | None, dtype: torch.dtype) -> StableDiffusionPipeline:
    if os.path.isdir(path):
        if config is not None:
            raise ModelError(
                f"`config` {os.fspath(config)!r} is only for single-file checkpoints; drop it for the folder {path!r}."
            )
        return StableDiffusionPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
        )
    return _load_single_file(path, config, dtype)


# -- single-file checkpoints ----------------------------------------------------------------------------


def checkpoint_family(checkpoint: str | os.PathLike[str] | Mapping[str, Sequence[int]]) -> str:
    """`"v1"` or `"v2"` for an original-layout SD checkpoint; `ModelError` for any other.

    `checkpoint` is a file or its tensor names and shapes. A file is read for names and shapes only: the
    safetensors header, or a `.ckpt` through `torch.load(weights_only=True)` (memory-mapped when the file
    is a zip archive, so the tensors are not read).
    """
    if isinstance(checkpoint, Mapping):
        return _family("checkpoint", {key: tuple(shape) for key, shape in checkpoint.items()})
    return _family(os.fspath(checkpoint), _checkpoint_shapes(os.fspath(checkpoint)))


def _family(path: str, shapes: dict[str, tuple[int, ...]]) -> str:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}  # names and shapes only
    family = infer_diffusers_model_type(meta)
    if family not in _SINGLE_FILE_FAMILIES:
        name = _FAMILY_NAMES.get(family, f"a {family!r} checkpoint")
        raise ModelError(
            f"`model` {path!r} is {name}, which cones does not support; it supports {SUPPORTED}."
        )
    conv_in = shapes.get(_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4 or conv_in[1] != 4:
        raise ModelError(
            f"`model` {path!r} holds no 4-channel Stable Diffusion UNet "
            f"(`{_UNET_PREFIX}input_blocks.0.0.weight`); it supports {SUPPORTED}."
        )
    for prefix, part in (("first_stage_model.", "VAE"), ("cond_stage_model.", "text encoder")):
        if not any(key.startswith(prefix) for key in shapes):
            raise ModelError(
                f"`model` {path!r} holds no {part} (`{prefix}*` weights); pass a full checkpoint "
                "(UNet, VAE and text encoder) or a diffusers folder."
            )
    return family


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a single checkpoint, without running any pickled code."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ModelError(
                f"`model` {path!r} is not a readable safetensors file ({e}); re-download it."
            ) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise ModelError(
            f"`model` {path!r} holds pickled Python objects besides tensors, and cones never unpickles code "
            "(torch.load weights_only=True); convert it to .safetensors with a tool you trust, or pass a diffusers folder."
        ) from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ModelError(
            f"`model` {path!r} is not a readable checkpoint ({' '.join(str(e).split())[:200]})."
        ) from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelError(
            f"`model` {path!r} holds a {type(checkpoint).__name__}, not a state dict; pass an SD checkpoint."
        )
    return {key: tuple(t.shape) for key, t in checkpoint.items() if isinstance(t, torch.Tensor)}


def _load_single_file(
    path: str, config: str | os.PathLike[str] | None, dtype: torch.dtype
) -> StableDiffusionPipeline:
    shapes = _checkpoint_shapes(path)
    family = _family(path, shapes)
    if config is None:
        raise ModelError(
            f"`config` is missing: the single checkpoint {path!r} needs a local diffusers folder of the same "
            f"{_SINGLE_FILE_FAMILIES[family]} variant for its tokenizer, scheduler and configs; pass config=<folder> (--config)."
        )
    config = os.fspath(config)
    if not os.path.isdir(config):
        raise ModelError(
            f"`config` {config!r} is not a folder; pass a local diffusers Stable Diffusion folder."
        )
    _check_folder_as_config(config)
    _check_cross_attention_dim(path, shapes, config)
    return StableDiffusionPipeline.from_single_file(
        path,
        config=config,
        dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


def _check_folder_as_config(config: str) -> None:
    try:
        _check_folder(config)
    except ModelError as e:
        raise ModelError(str(e).replace("`model`", "`config`", 1)) from None


def _check_cross_attention_dim(path: str, shapes: dict[str, tuple[int, ...]], config: str) -> None:
    """Refuse a `config` folder of another variant (SD 1.x folder, SD 2.x file) before diffusers converts."""
    try:
        with open(os.path.join(config, "unet", "config.json"), encoding="utf-8") as f:
            expected = json.load(f).get("cross_attention_dim")
    except (OSError, ValueError, AttributeError):
        raise ModelError(
            f"`config` {config!r} has no readable unet/config.json; pass a complete diffusers Stable Diffusion folder."
        ) from None
    found = next((shape[1] for key, shape in shapes.items() if _CROSS_KEY.match(key)), None)
    if found is not None and expected is not None and found != expected:
        raise ModelError(
            f"`config` {config!r} is for cross_attention_dim {expected} but {path!r} has {found} "
            "(768: SD 1.x, 1024: SD 2.x); pass the diffusers folder of the checkpoint's own variant."
        )
