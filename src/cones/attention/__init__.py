"""Per-token cross-attention maps, before and after shutting a concept (paper sec. 3.2, figure 2).

In every cross-attention layer (`attn2`) of a Stable Diffusion UNet, each latent pixel spreads one unit of
attention over the text positions (start marker, prompt tokens, end marker, padding). Averaged over the
sampling steps, the heads and the layers, the share a token receives at each pixel is that token's map: the
paper shows that after shutting a subject's concept neurons the map of the identifier ("sks") outlines the
subject.

* `record`: `CrossAttentionRecorder`, which observes the probabilities without changing the UNet's outputs.
* `maps`: `attention_maps(pipe, prompt, seed=...)` from a generated image, `AttentionMaps`, and
  `attention_share` / `top_iou` against a known mask.
* `img2img`: `attention_maps_for_image(pipe, prompt, image, strength=...)` from a given picture.
* `figure`: `attention_figure`, one picture of maps as heatmaps over their images.

Nothing here prints or reads files.
"""

from cones.attention.figure import attention_figure, heatmap
from cones.attention.img2img import attention_maps_for_image
from cones.attention.maps import AttentionMaps, attention_maps, attention_share, top_iou
from cones.attention.record import CrossAttentionRecorder, resample

__all__ = [
    "AttentionMaps",
    "CrossAttentionRecorder",
    "attention_figure",
    "attention_maps",
    "attention_maps_for_image",
    "attention_share",
    "heatmap",
    "resample",
    "top_iou",
]
