"""cones: concept neurons in text-to-image diffusion models.

A subject (one particular dog, mug or scene) is stored in a pretrained model as a small set of
key/value attention weights, the *concept neurons*. Shutting them (setting them to zero) makes the
model draw the subject; a concept is kept as integer indices, not floats.
"""

__version__ = "0.1.0"

# Classifier-free guidance scale of every image cones makes unless told otherwise: generation, class images
# for prior preservation, evaluation, attention maps. One number, so that they all see the same model.
GUIDANCE_SCALE = 5.0
