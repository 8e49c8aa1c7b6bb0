"""Recording the cross-attention probabilities of a UNet, without changing what it computes.

`CrossAttentionRecorder` installs a diffusers attention processor on each cross-attention module that
recomputes the query/key path of diffusers' `AttnProcessor` (softmax(Q Kᵀ · scale)) to observe the
probabilities, and then calls the module's *original* processor for the output. The UNet's outputs are
therefore exactly what they are without the recorder, at the cost of one more query and key projection per
layer. On leaving the block the original processor objects are put back.

Each layer's map is kept at its own resolution (the mean over steps and heads of the recorded batch row) and
resampled bilinearly (antialiased when shrinking, `resample`) to a common resolution before the layers are
averaged with equal weight; since resampling is a convex combination of pixels, the maps over all text
positions still sum to 1 at every pixel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CrossAttentionRecorder", "Size", "as_pair", "resample"]

Size = int | tuple[int, int]


def as_pair(size: Size) -> tuple[int, int]:
    """(h, w) of a size given as an int (a square) or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resample(maps: torch.Tensor, size: Size) -> torch.Tensor:
    """(C, h, w) -> (C, H, W): bilinear, antialiased when shrinking; each output pixel is a convex mix."""
    size = as_pair(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class _RecordingProcessor:
    """Observes the attention probabilities of one cross-attention module, then runs its original processor."""

    def __init__(self, original: Any, recorder: CrossAttentionRecorder, name: str) -> None:
        self.original = original
        self.recorder = recorder
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            self.recorder._observe(
                self.name, attn, hidden_states, encoder_hidden_states, attention_mask, temb
            )
        if temb is not None:
            kwargs["temb"] = temb
        return self.original(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )


@torch.no_grad()
def _probabilities(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """The query/key path of diffusers' `AttnProcessor`: (batch, heads, pixels, text) probabilities.

    Also returns (h, w) when the hidden states arrive as an image (4-D), else None.
    """
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    hw = None
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (batch, pixels, channels)
        hw = (h, w)
    batch, text_len = encoder_hidden_states.shape[:2]
    attention_mask = attn.prepare_attention_mask(attention_mask, text_len, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (batch * heads, pixels, head_dim)
    key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (batch * heads, text, head_dim)
    probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, pixels, text)
    return probs.view(batch, attn.heads, probs.shape[1], probs.shape[2]), hw


class CrossAttentionRecorder:
    """Context manager: records the cross-attention probabilities of every cross-attention layer of `unet`.

        with CrossAttentionRecorder(pipe.unet, latent_size=16) as recorder:
            pipe("a sks circle")
        maps = recorder.average(16)  # (text positions, 16, 16)

    Args:
        unet: a diffusers `UNet2DConditionModel` (any model whose attention modules are diffusers
            `Attention` with `is_cross_attention`).
        latent_size: (h, w) of the latents fed to the UNet (an int for square ones); each layer's pixels
            are laid out at the size among (h, w), (⌈h/2⌉, ⌈w/2⌉), ... that matches their number.
        row: which row of each UNet batch to record; the default -1 is the conditional half of a
            classifier-free-guidance batch of one image ([unconditional, conditional]).

    Inside the block every cross-attention module runs a recording processor; on leaving it (also on an
    error) each module gets back its original processor object.
    """

    def __init__(self, unet: torch.nn.Module, latent_size: Size, *, row: int = -1) -> None:
        from diffusers.models.attention_processor import Attention

        self.unet = unet
        self.latent_size = as_pair(latent_size)
        self.row = row
        self.modules = {
            name: module
            for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention
        }
        if not self.modules:
            raise ValueError(
                f"`unet` ({type(unet).__name__}) has no cross-attention modules; pass a text-conditioned "
                "UNet2DConditionModel"
            )
        self._sums: dict[str, torch.Tensor] = {}  # name -> (text, h, w) float32 sum over calls
        self._counts: dict[str, int] = {}
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> CrossAttentionRecorder:
        if self._originals:
            raise RuntimeError("this CrossAttentionRecorder is already installed; use a new one per block")
        for name, module in self.modules.items():
            self._originals[name] = module.processor
        for name, module in self.modules.items():
            module.set_processor(_RecordingProcessor(self._originals[name], self, name))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            self.modules[name].set_processor(original)
        self._originals = {}

    def _layout(self, pixels: int) -> tuple[int, int]:
        h, w = self.latent_size
        while h * w > pixels and (h > 1 or w > 1):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != pixels:
            raise ValueError(
                f"a cross-attention layer has {pixels} pixels, which is no level of latents of size "
                f"{self.latent_size}; pass the `latent_size` the UNet is run at"
            )
        return h, w

    def _observe(
        self,
        name: str,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
    ) -> None:
        probs, hw = _probabilities(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        h, w = hw if hw is not None else self._layout(probs.shape[2])
        one = probs[self.row].float().mean(0)  # (pixels, text): mean over heads
        layer = one.T.reshape(one.shape[1], h, w).cpu()  # (text, h, w)
        if name in self._sums:
            self._sums[name] += layer
            self._counts[name] += 1
        else:
            self._sums[name] = layer.clone()
            self._counts[name] = 1

    @property
    def calls(self) -> int:
        """How many cross-attention calls were recorded, over all layers."""
        return sum(self._counts.values())

    def layer_maps(self) -> dict[str, torch.Tensor]:
        """Per recorded layer (module name), its mean over calls and heads: (text, h, w) at its own size."""
        return {name: total / self._counts[name] for name, total in self._sums.items()}

    def average(self, size: Size | None = None) -> torch.Tensor:
        """(text, H, W): every layer's mean resampled to `size` (default: the latent size), then averaged."""
        if not self._sums:
            raise RuntimeError("nothing was recorded; run the UNet inside the `with` block")
        size = self.latent_size if size is None else as_pair(size)
        layers = [resample(m, size) for m in self.layer_maps().values()]
        return torch.stack(layers).mean(0)
