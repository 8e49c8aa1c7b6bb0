"""Memory of a search on full-size Stable Diffusion: gradient checkpointing and the attention kernels.

Half-precision weights, the other way to save memory, are the dtype policy of `cones.dtypes`.

**Gradient checkpointing** (`load_pipeline(gradient_checkpointing=True)`, `gradient_checkpointing(unet)`)
recomputes each UNet block's activations during the backward pass instead of keeping them: much less
activation memory for some 25-35% more time per step (`benchmarks/gpu_check.py` measures both).
diffusers checkpoints whenever gradients are enabled (train or eval mode) with `use_reentrant=False`,
which works with the search's `torch.autograd.grad`; the gradients are the same up to rounding.

**Attention**: on torch >= 2, diffusers' default processor for every attention layer is
`AttnProcessor2_0`, which calls `torch.nn.functional.scaled_dot_product_attention`; on CUDA, torch picks
the flash or memory-efficient kernel for it (no xformers needed), on the CPU a fused or plain kernel.
`attention_processors(unet)` says which processors a UNet uses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["attention_processors", "gradient_checkpointing", "memory_settings", "uses_sdpa"]


def attention_processors(unet: nn.Module) -> dict[str, int]:
    """How many attention layers of `unet` use each processor class, e.g. `{"AttnProcessor2_0": 32}`."""
    processors = getattr(unet, "attn_processors", None)
    if processors is None:
        raise ValueError(f"`unet` ({type(unet).__name__}) has no `attn_processors`; pass a diffusers UNet.")
    return dict(Counter(type(p).__name__ for p in processors.values()))


def uses_sdpa(unet: nn.Module) -> bool:
    """True when every attention layer of `unet` runs `F.scaled_dot_product_attention` (`AttnProcessor2_0`)."""
    return set(attention_processors(unet)) == {"AttnProcessor2_0"}


@contextmanager
def gradient_checkpointing(unet: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside the block, `unet` checkpoints its activations (or not, with `enabled=False`); restored after."""
    was = bool(unet.is_gradient_checkpointing)
    if enabled != was:
        unet.enable_gradient_checkpointing() if enabled else unet.disable_gradient_checkpointing()
    try:
        yield unet
    finally:
        if bool(unet.is_gradient_checkpointing) != was:
            unet.enable_gradient_checkpointing() if was else unet.disable_gradient_checkpointing()


def memory_settings(unet: nn.Module) -> dict[str, Any]:
    """The UNet's precision and memory settings, as JSON-ready values (for reports and benchmarks)."""
    return {
        "dtype": str(unet.dtype).removeprefix("torch."),
        "gradient_checkpointing": bool(unet.is_gradient_checkpointing),
        "attention": attention_processors(unet),
        "parameters": sum(p.numel() for p in unet.parameters()),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in unet.parameters()),
    }
