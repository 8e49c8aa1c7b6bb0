"""The embedded world: a procedural scene renderer, its vocabulary, and the small Stable-Diffusion-format
model trained on it that cones ships as its default base model."""
