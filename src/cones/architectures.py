"""The UNet configurations of real Stable Diffusion models, for full-size tests and benchmarks.

Built from these, a `UNet2DConditionModel` has exactly the parameter names and shapes of the released
checkpoints (random weights, nothing downloaded), which is all that targets, files and switching depend on.
"""

SD1_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD2_UNET = {
    **SD1_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
