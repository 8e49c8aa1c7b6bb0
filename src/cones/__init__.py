"""cones: concept neurons in text-to-image diffusion models.

A subject (one particular dog, mug or scene) is stored in a pretrained model as a small set of
key/value attention weights, the *concept neurons*. Shutting them (setting them to zero) makes the
model draw the subject; a concept is kept as integer indices, not floats.
"""

__version__ = "0.1.0"

# Classifier-free guidance scale of every image cones makes unless told otherwise: generation, class images
# for prior preservation, evaluation, attention maps. One number, so that they all see the same model. 7.5 is
# Stable Diffusion's own default, and on the embedded world model it follows prompts best of 3 / 5 / 7.5 / 10
# (benchmarks/bench_world.py measures all four each run).
GUIDANCE_SCALE = 7.5
