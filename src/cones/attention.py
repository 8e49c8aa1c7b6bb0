"""Per-token cross-attention maps, before and after shutting a concept (paper sec. 3.2, figure 2).

In every cross-attention layer (`attn2`) of a Stable Diffusion UNet, each latent pixel spreads one unit of
attention over the text positions (start marker, prompt tokens, end marker, padding). Averaged over the
sampling steps, the heads and the layers, the share a token receives at each pixel is that token's map: the
paper shows that after shutting a subject's concept neurons the map of the identifier ("sks") outlines the
subject.

How the maps are taken: `CrossAttentionRecorder` installs a diffusers attention processor on each
cross-attention module that recomputes the query/key path of diffusers' `AttnProcessor`
(softmax(Q Kᵀ · scale)) to observe the probabilities, and then calls the module's *original* processor for
the output. The UNet's outputs are therefore exactly what they are without the recorder (the image of
`attention_maps` is the image `cones.generate.generate` makes with the same seed), at the cost of one more
query and key projection per layer. On leaving the block the original processor objects are put back.

Each layer's map is kept at its own resolution (the mean over steps and heads of the recorded batch row) and
resampled bilinearly (antialiased when shrinking) to a common resolution before the layers are averaged
with equal weight; since resampling is a convex combination of pixels, the maps over all text positions
still sum to 1 at every pixel.

Two ways to get maps:

- `attention_maps(pipe, prompt, seed=...)`: generate an image from noise and record;
- `attention_maps_for_image(pipe, prompt, image, strength=...)`: noise a given picture to an intermediate
  timestep and denoise it, recording (as img2img does, written out here). Where the subject's true mask is
  known (a rendered scene), `attention_share` and `top_iou` measure how well a token's map outlines it.

`attention_figure` draws one picture: per row, the generated image and each token's map as a heatmap over
it. Nothing here prints or reads files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from cones import GUIDANCE_SCALE

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from cones.neurons import ConceptNeurons

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

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resample(maps: torch.Tensor, size: Size) -> torch.Tensor:
    """(C, h, w) -> (C, H, W): bilinear, antialiased when shrinking; each output pixel is a convex mix."""
    size = _pair(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


# -- recording ------------------------------------------------------------------------------------------


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
        self.latent_size = _pair(latent_size)
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
        size = self.latent_size if size is None else _pair(size)
        layers = [resample(m, size) for m in self.layer_maps().values()]
        return torch.stack(layers).mean(0)


# -- the maps of one prompt -----------------------------------------------------------------------------


@dataclass
class AttentionMaps:
    """Cross-attention maps of one prompt on one image, averaged over steps, heads and layers.

    `probabilities[k]` is the mean share of attention that text position k (0: the start marker, then the
    prompt's tokens, the end marker and padding) receives at each pixel; over k it sums to 1 everywhere.
    """

    prompt: str
    tokens: list[str]  # the prompt's tokens, in order, without start and end markers
    probabilities: torch.Tensor  # (text positions, H, W) float32
    image: Image.Image  # the image the maps belong to (the generated or denoised picture)
    layers: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (text, h, w), each layer's own
    calls: int = 0  # cross-attention calls averaged: UNet evaluations x cross-attention layers

    @property
    def maps(self) -> torch.Tensor:
        """(tokens, H, W): the maps of the prompt's tokens, in the order of `tokens`."""
        return self.probabilities[1 : 1 + len(self.tokens)]

    @property
    def prompt_maps(self) -> torch.Tensor:
        """(tokens, H, W): `maps` renormalised over the prompt's tokens, summing to 1 at every pixel.

        Each token's share of the attention that the prompt's own tokens receive, leaving out the start and
        end markers and the padding (as Attend-and-Excite does): those take most of the attention in many
        models, and their spatial pattern, shared by every token's raw map, cancels here.
        """
        maps = self.maps
        return maps / maps.sum(0, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)

    def token_map(self, word: str, *, over: str = "text") -> torch.Tensor:
        """(H, W): the map of `word` (the mean over its tokens when it spans several; its first occurrence).

        `over="text"`: from `maps` (share of all text positions); `over="prompt"`: from `prompt_maps`.
        """
        maps = _chosen(self, over)
        target = word.strip().lower()
        for i in range(len(self.tokens)):
            text = ""
            for j in range(i, len(self.tokens)):
                text += self.tokens[j].lower()
                if text == target:
                    return maps[i : j + 1].mean(0)
                if len(text) >= len(target):
                    break
        raise ValueError(
            f"`word` {word!r} is not among the tokens {self.tokens} of {self.prompt!r}; pass one of them"
        )


def _chosen(maps: AttentionMaps, over: str) -> torch.Tensor:
    if over == "text":
        return maps.maps
    if over == "prompt":
        return maps.prompt_maps
    raise ValueError(f"`over` must be 'text' or 'prompt', got {over!r}")


def _prompt_tokens(pipe: StableDiffusionPipeline, prompt: str) -> list[str]:
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt).input_ids
    if len(ids) > tokenizer.model_max_length:
        raise ValueError(
            f"`prompt` {prompt!r} is {len(ids)} tokens, over the tokenizer's {tokenizer.model_max_length}; "
            "shorten it"
        )
    return [tokenizer.decode([i]).strip() for i in ids[1:-1]]


def _latent_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    return _pair(pipe.unet.config.sample_size)


def _collect(
    prompt: str,
    tokens: list[str],
    recorder: CrossAttentionRecorder,
    image: Image.Image,
    resolution: Size | None,
) -> AttentionMaps:
    return AttentionMaps(
        prompt=prompt,
        tokens=tokens,
        probabilities=recorder.average(resolution),
        image=image,
        layers=recorder.layer_maps(),
        calls=recorder.calls,
    )


def attention_maps(
    pipe: StableDiffusionPipeline,
    prompt: str,
    *,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = GUIDANCE_SCALE,
    resolution: Size | None = None,
    concept: ConceptNeurons | None = None,
) -> AttentionMaps:
    """Generate one image of `prompt` and return its cross-attention maps.

    The image is the one `cones.generate.generate(pipe, [prompt], [seed], ...)` makes (the recorder does not
    change the computation). `concept`, when given, is shut during the call and restored after it.
    `resolution` is the size of the maps (default: the latent size, e.g. 64 for SD 1.x, 16 for the world).
    """
    from cones.generate import generate

    tokens = _prompt_tokens(pipe, prompt)
    with ExitStack() as stack:
        if concept is not None:
            stack.enter_context(concept.shut(pipe.unet))
        recorder = stack.enter_context(CrossAttentionRecorder(pipe.unet, _latent_size(pipe)))
        image = generate(pipe, [prompt], [seed], steps=steps, guidance_scale=guidance_scale)[0][0]
    return _collect(prompt, tokens, recorder, image, resolution)


@torch.no_grad()
def _denoise_from(
    pipe: StableDiffusionPipeline,
    prompt: str,
    image: Image.Image,
    *,
    seed: int,
    strength: float,
    steps: int,
    guidance_scale: float,
) -> Image.Image:
    """Noise `image` to the timestep `strength` of the way up the schedule and denoise it with `prompt`."""
    from cones.images import model_resolution, square, to_tensor

    device, dtype = pipe.unet.device, pipe.unet.dtype
    pixels = to_tensor([square(image.convert("RGB"), model_resolution(pipe))]).to(device, pipe.vae.dtype)

    # 1. The clean latents (the mean of the VAE posterior) and the schedule's tail from `strength`.
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (1, C, h, w)
    latents = latents.to(dtype)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # leaves the pipeline's own untouched
    scheduler.set_timesteps(steps, device=device)
    start = steps - min(steps, max(1, int(round(steps * strength))))
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[start * order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)

    # 2. Noise them to the first remaining timestep (noise drawn on the CPU, as `generate` does).
    noise = torch.randn(
        latents.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
    )
    latents = scheduler.add_noise(latents, noise.to(device, dtype), timesteps[:1])

    # 3. Text embeddings: [unconditional, conditional] under classifier-free guidance.
    guided = guidance_scale > 1.0
    cond, uncond = pipe.encode_prompt(prompt, device, 1, guided)  # (1, text, dim) each
    embeds = torch.cat([uncond, cond]) if guided else cond

    # 4. The denoising loop.
    for t in timesteps:
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = pipe.unet(model_in, t, encoder_hidden_states=embeds).sample
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents).prev_sample

    # 5. Decode.
    decoded = pipe.vae.decode(
        latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
    ).sample  # (1, 3, H, W)
    array = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def attention_maps_for_image(
    pipe: StableDiffusionPipeline,
    prompt: str,
    image: Image.Image,
    *,
    strength: float = 0.6,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = GUIDANCE_SCALE,
    resolution: Size | None = None,
    concept: ConceptNeurons | None = None,
) -> AttentionMaps:
    """Noise `image` part of the way and denoise it with `prompt`, recording the cross-attention maps.

    `image` is centre-cropped to a square at the model's resolution. `strength` in (0, 1] is the share of
    the `steps` sampling steps that are run: 1 starts from (nearly) pure noise, small values keep the
    picture's layout, so its objects' masks stay valid for the maps. The returned `image` is the denoised
    picture. `concept`, when given, is shut during the call.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be in (0, 1], got {strength}; e.g. 0.6")
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1, got {steps}; e.g. 25")
    tokens = _prompt_tokens(pipe, prompt)
    with ExitStack() as stack:
        if concept is not None:
            stack.enter_context(concept.shut(pipe.unet))
        recorder = stack.enter_context(CrossAttentionRecorder(pipe.unet, _latent_size(pipe)))
        out = _denoise_from(
            pipe, prompt, image, seed=seed, strength=strength, steps=steps, guidance_scale=guidance_scale
        )
    return _collect(prompt, tokens, recorder, out, resolution)


# -- masks and overlap ----------------------------------------------------------------------------------


def _check_pair(
    attention: torch.Tensor | np.ndarray, mask: np.ndarray | torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(attention, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if a.shape != m.shape or a.ndim != 2:
        raise ValueError(
            f"`attention` {a.shape} and `mask` {m.shape} must be 2-D of one shape; resample the map to the "
            "mask's size (`resolution=`)"
        )
    if not m.any():
        raise ValueError("`mask` is empty; pass the mask of a visible object")
    return a, m


def attention_share(attention: torch.Tensor | np.ndarray, mask: np.ndarray | torch.Tensor) -> float:
    """Share of the map's mass inside `mask`: Σ a·m / Σ a. A uniform map scores the mask's area share."""
    a, m = _check_pair(attention, mask)
    total = a.sum()
    return float(a[m].sum() / total) if total > 0 else float("nan")


def top_iou(
    attention: torch.Tensor | np.ndarray, mask: np.ndarray | torch.Tensor, q: float | None = None
) -> float:
    """IoU of the map's top-`q` share of pixels with `mask` (`q` defaults to the mask's area share).

    Ties at the cut are broken by position (the first pixels in raster order win).
    """
    a, m = _check_pair(attention, mask)
    q = m.mean() if q is None else q
    if not 0.0 < q <= 1.0:
        raise ValueError(f"`q` must be in (0, 1], got {q}; e.g. 0.1 for the top 10% of pixels")
    k = max(1, int(round(q * a.size)))
    order = np.argsort(-a.reshape(-1), kind="stable")[:k]
    top = np.zeros(a.size, dtype=bool)
    top[order] = True
    top = top.reshape(a.shape)
    return float((top & m).sum() / (top | m).sum())


# -- the picture ----------------------------------------------------------------------------------------

# Anchor colours of a perceptually ordered dark-to-bright ramp (close to matplotlib's "inferno").
_RAMP = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def heatmap(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours of a dark-to-bright ramp."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    frac = (x - lo)[..., None]
    return np.rint(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


def _overlay(image: Image.Image, attention: torch.Tensor, size: int, alpha: float) -> Image.Image:
    """The map, stretched to [0, 1] between its minimum and maximum, as a heatmap over the image."""
    a = resample(attention[None].float(), size)[0].numpy()
    spread = a.max() - a.min()
    a = (a - a.min()) / spread if spread > 0 else np.zeros_like(a)
    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float64)
    mixed = (1 - alpha) * base + alpha * heatmap(a)
    return Image.fromarray(np.rint(mixed).astype(np.uint8))


def attention_figure(
    rows: Sequence[AttentionMaps],
    labels: Sequence[str] | None = None,
    *,
    over: str = "prompt",
    panel: int = 128,
    alpha: float = 0.6,
) -> Image.Image:
    """One picture: per row, its image, then each token's map as a heatmap over that image.

    `over="prompt"` (default) shows `prompt_maps` (each token's share among the prompt's tokens),
    `over="text"` the raw `maps` (share of all text positions). Each map is stretched between its own
    minimum and maximum (dark: least, bright: most attention), so the caption above it gives the token and
    its mean share over the pixels: maps of a flat attention look as contrasted as sharp ones, the share
    tells them apart. `labels` name the rows (e.g. "before", "after").
    """
    if not rows:
        raise ValueError("`rows` is empty; pass at least one AttentionMaps")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(rows)} rows; give one per row")
    font = ImageFont.load_default()
    caption, gap = 14, 4
    label_w = 0 if labels is None else 8 + max(int(font.getlength(str(t))) for t in labels)
    columns = 1 + max(len(r.tokens) for r in rows)
    width = label_w + columns * (panel + gap) + gap
    height = len(rows) * (caption + panel + gap) + gap
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    for i, row in enumerate(rows):
        top = gap + i * (caption + panel + gap)
        if labels is not None:
            draw.text((4, top + caption + panel // 2 - 6), str(labels[i]), fill="black", font=font)
        x = label_w + gap
        draw.text((x, top), "image", fill="black", font=font)
        picture.paste(row.image.convert("RGB").resize((panel, panel), Image.BICUBIC), (x, top + caption))
        maps = _chosen(row, over)
        for j, token in enumerate(row.tokens):
            x = label_w + gap + (j + 1) * (panel + gap)
            share = float(maps[j].mean())
            draw.text((x, top), f"{token} {share:.3f}", fill="black", font=font)
            picture.paste(_overlay(row.image, maps[j], panel, alpha), (x, top + caption))
    return picture
