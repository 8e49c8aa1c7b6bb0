"""Concepts where users generate: a LoRA-style weight-difference file, and a checkpoint with a concept baked in.

Two forms, for the programs people generate with:

* **diff** (`export_diff`, `cones export --format diff`): the concept as the weight differences it makes,
  −θ at every shut position and 0 elsewhere, one full tensor per parameter that holds neurons. The keys
  follow the kohya/LyCORIS naming that ComfyUI's and AUTOMATIC1111's LoRA loaders read: the diffusers
  module path with its dots made underscores, after `lora_unet_`, and `.diff` for a full-weight
  difference (ComfyUI `comfy/lora.py`: `model_lora_keys_unet` maps `lora_unet_<path>` to the UNet weight
  and `load_lora` patches `<key>.diff` as ("diff", w); A1111 `extensions-builtin/Lora/network_full.py`
  reads the `diff` weight of a network module). At strength 1 the loader adds it to the weight:
  θ + (−θ) = 0 at the shut positions, exactly, and θ + 0 = θ elsewhere.

      down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight
      -> lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.diff

* **bake** (`bake_checkpoint`, `cones bake`): a single original-layout Stable Diffusion checkpoint
  (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`) with the concept
  shut, which any SD program loads as a model (and diffusers through `from_single_file`). A diffusers
  folder is converted (`to_ldm`, the inverse of diffusers' own conversion, for CLIP text encoders: SD 1.x
  and models built like it); a single checkpoint keeps its own tensors, with the shut positions zeroed.

Both write through a temporary file and refuse to replace an existing file unless `overwrite`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from cones.neurons import ConceptNeurons

__all__ = [
    "ExportError",
    "bake_checkpoint",
    "concept_diff",
    "export_diff",
    "ldm_key",
    "lora_key",
    "to_ldm",
    "unet_to_ldm",
    "vae_to_ldm",
]

LORA_PREFIX = "lora_unet_"
DIFF_SUFFIX = ".diff"


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says what to change."""


# -- keys ----------------------------------------------------------------------------------------------


def lora_key(name: str) -> str:
    """The LoRA/LyCORIS module key of a diffusers UNet weight: `lora_unet_` + its path, dots as underscores."""
    if not name.endswith(".weight"):
        raise ExportError(f"`{name}` is not a weight; only `*.weight` parameters have LoRA keys")
    return LORA_PREFIX + name[: -len(".weight")].replace(".", "_")


_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTENTION = [
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]


def ldm_key(name: str, config: Mapping) -> str:
    """The original-layout name (`model.diffusion_model.…`) of diffusers UNet parameter `name`.

    Input block 1 + i(L+1) + j holds down block i's layer j (resnet .0, attention .1), input block
    (i+1)(L+1) its downsampler; output block i(L+1) + j holds up block i's layer j, whose last layer also
    holds the upsampler (.1 without attention, .2 with); the middle block is resnet, attention, resnet.
    L is `config["layers_per_block"]`.
    """
    layers = config["layers_per_block"]
    parts = name.split(".")
    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            new = f"input_blocks.{(i + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
        else:
            block = 1 + i * (layers + 1) + int(parts[3])
            new = f"input_blocks.{block}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
    elif parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
            new = f"output_blocks.{i * (layers + 1) + layers}.{slot}." + ".".join(parts[4:])
        else:
            block = i * (layers + 1) + int(parts[3])
            new = f"output_blocks.{block}.{0 if kind == 'resnets' else 1}." + ".".join(parts[4:])
    elif parts[0] == "mid_block":
        slot = 2 * int(parts[2]) if parts[1] == "resnets" else 1
        new = f"middle_block.{slot}." + ".".join(parts[3:])
    else:
        top = ".".join(parts[:-1])
        if top not in _UNET_TOP:
            raise ExportError(f"UNet parameter `{name}` has no original-layout name that cones knows")
        new = _UNET_TOP[top] + "." + parts[-1]
    if ".resnets." in name:
        for diffusers_name, ldm_name in _RESNET:
            new = new.replace(f".{diffusers_name}.", f".{ldm_name}.")
    return "model.diffusion_model." + new


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel` state dict under the original `model.diffusion_model.` names."""
    return {ldm_key(key, config): t for key, t in state.items()}


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict under the original `first_stage_model.` names."""
    n = len(config["up_block_types"])
    out = {}
    for key, t in state.items():
        parts = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut").split(".")
        coder = parts[0]
        if parts[1] == "down_blocks":
            i, kind = int(parts[2]), parts[3]
            inner = (
                "downsample." + ".".join(parts[5:])
                if kind == "downsamplers"
                else f"block.{parts[4]}." + ".".join(parts[5:])
            )
            new = f"{coder}.down.{i}.{inner}"
        elif parts[1] == "up_blocks":
            i, kind = n - 1 - int(parts[2]), parts[3]  # the original numbers up blocks from the bottom
            inner = (
                "upsample." + ".".join(parts[5:])
                if kind == "upsamplers"
                else f"block.{parts[4]}." + ".".join(parts[5:])
            )
            new = f"{coder}.up.{i}.{inner}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{coder}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":
            rest = ".".join(parts[4:])
            for diffusers_name, ldm_name in _VAE_ATTENTION:
                if rest.startswith(diffusers_name + "."):
                    rest = ldm_name + rest[len(diffusers_name) :]
            new = f"{coder}.mid.attn_1.{rest}"
            t = t[:, :, None, None] if t.ndim == 2 else t  # the original's 1x1 convolutions
        else:
            new = ".".join(parts)
        out["first_stage_model." + new] = t
    return out


def to_ldm(pipe) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP text encoder of an SD 1.x-style pipeline as one original-layout state dict.

    The UNet is taken as it is now: concepts shut in it are shut in the result.
    """
    from transformers import CLIPTextModel

    if pipe.unet.config.get("cross_attention_dim") == 1024:
        raise ExportError(
            "this is an SD 2.x model, whose original layout holds an OpenCLIP text encoder that cones does not "
            "write; pass the model's single .safetensors checkpoint as --model (with --config)"
        )
    if not isinstance(pipe.text_encoder, CLIPTextModel):
        raise ExportError(
            f"the text encoder is a {type(pipe.text_encoder).__name__}; a diffusers folder can be baked only "
            "with a CLIP text encoder (SD 1.x); pass the model's single .safetensors checkpoint as --model"
        )
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    text = (
        pipe.text_encoder.state_dict()
    )  # transformers 5 drops the "text_model." prefix; the original has it
    state.update(
        {
            "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in text.items()
        }
    )
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


# -- writing -------------------------------------------------------------------------------------------


def _check_out(path: str, overwrite: bool) -> None:
    if not path.endswith(".safetensors"):
        raise ExportError(f"`out` {path!r} should end in .safetensors; e.g. --out dog.safetensors")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")


def _save_atomic(
    tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str], overwrite: bool
) -> None:
    """safetensors through a temporary file beside `path`, renamed into place; nothing half-written stays."""
    from safetensors.torch import save_file

    _check_out(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=metadata)
        if os.path.exists(path) and not overwrite:  # appeared meanwhile
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _about(concept: ConceptNeurons) -> dict[str, str]:
    return {
        "cones_token": concept.token or "",
        "cones_class_word": concept.class_word or "",
        "cones_neurons": str(concept.num_neurons),
        "cones_base_model": str(concept.metadata.get("base_model", "")),
    }


# -- diff ----------------------------------------------------------------------------------------------


def concept_diff(
    concept: ConceptNeurons, unet: torch.nn.Module, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """`{lora_key(name) + ".diff": Δ}` with Δ = −θ at the concept's positions and 0 elsewhere.

    θ is `unet`'s weight as it is, so the concept must not be shut in it (that would give Δ = 0).
    Parameters without neurons are left out. `dtype` defaults to the weights' own (exact); a narrower
    one makes a smaller file that shuts exactly only on a model of that precision.
    """
    from cones import switching

    if any(c is concept or c == concept for c in switching.applied_concepts(unet)):
        raise ExportError("the concept is shut in this UNet now; export from the base model's weights")
    params = concept.parameters_in(unet)
    out = {}
    for name, idx in concept.indices.items():
        if idx.numel() == 0:
            continue
        weight = params[name].detach().to("cpu")
        diff = torch.zeros(weight.numel(), dtype=weight.dtype)
        diff[idx] = -weight.reshape(-1)[idx]
        out[lora_key(name) + DIFF_SUFFIX] = diff.reshape(weight.shape).to(dtype or weight.dtype).contiguous()
    if not out:
        raise ExportError("the concept holds no neurons; there is no difference to export")
    return out


def export_diff(
    concept: ConceptNeurons,
    unet: torch.nn.Module,
    path: str,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> dict[str, torch.Tensor]:
    """Write `concept_diff` to `path` (.safetensors) atomically; return what was written."""
    _check_out(path, overwrite)
    tensors = concept_diff(concept, unet, dtype)
    metadata = {"format": "pt", "cones_export": "diff", **_about(concept)}
    _save_atomic(tensors, path, metadata, overwrite)
    return tensors


# -- bake ----------------------------------------------------------------------------------------------


def _zero_in_checkpoint(state: dict[str, torch.Tensor], concept: ConceptNeurons, config: Mapping) -> None:
    for name, idx in concept.indices.items():
        if idx.numel() == 0:
            continue
        key = ldm_key(name, config)
        if key not in state:
            raise ExportError(
                f"the checkpoint has no `{key}` (the concept's `{name}`); pass its own base model"
            )
        weight = state[key]
        if tuple(weight.shape) != concept.shapes[name]:
            raise ExportError(
                f"`{key}` has shape {tuple(weight.shape)} in the checkpoint but {concept.shapes[name]} in the "
                "concept; the concept was made for another base model"
            )
        flat = weight.detach().clone().reshape(-1)
        flat[idx] = 0
        state[key] = flat.reshape(weight.shape).contiguous()


def bake_checkpoint(
    pipe,
    concepts: ConceptNeurons | list[ConceptNeurons],
    path: str,
    *,
    checkpoint: str | None = None,
    overwrite: bool = False,
) -> int:
    """Write one original-layout checkpoint with `concepts` shut; return the number of weights zeroed.

    `pipe` is the base model loaded (its UNet gives the names and checks that the concepts fit). With
    `checkpoint` (the single file `pipe` was loaded from) its tensors are copied and the shut positions
    zeroed; without, `pipe` is converted with `to_ldm`. The concepts are not left shut in `pipe`.
    """

    concepts = [concepts] if isinstance(concepts, ConceptNeurons) else list(concepts)
    if not concepts:
        raise ExportError("no concept given; pass one or more .cones files")
    _check_out(path, overwrite)
    for concept in concepts:
        concept.check_compatible(pipe.unet)
    joint = concepts[0].union(*concepts[1:]) if len(concepts) > 1 else concepts[0]
    if checkpoint is None:
        with joint.shut(pipe.unet):
            state = to_ldm(pipe)
    else:
        state = _read_checkpoint(checkpoint)
        _zero_in_checkpoint(state, joint, pipe.unet.config)
    about = _about(joint)
    about["cones_concepts"] = json.dumps([c.token or "" for c in concepts])
    _save_atomic(state, path, {"format": "pt", "cones_export": "bake", **about}, overwrite)
    return joint.num_neurons


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
