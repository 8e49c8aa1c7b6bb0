"""The paper's competitors, trained on the same model, data and objective as the concept-neuron search.

    from cones.baselines import dreambooth, custom_diffusion, textual_inversion, applied, save

    weights = custom_diffusion.train(pipe, [objective], steps=200)   # the same ConceptObjective as the search
    with applied(pipe, weights):                                     # removed again bit for bit afterwards
        images = generate(pipe, ["a sks dog on the beach"])
    save(weights, "dog-cd.safetensors")                              # Table 2: the file's bytes

Each module has `train(pipe, objectives, steps=, lr=, ...) -> BaselineWeights`, one loop for all three
(`cones.baselines.fit`, with the trainable identifier rows of `cones.baselines.tokens`). `BaselineWeights`
(`cones.baselines.weights`) is a `cones.patches.Patch` of a pipeline: `weights.apply(pipe)` / `remove(pipe)`,
or `applied(pipe, weights)`; `save` / `load` write and read it. `custom_diffusion.merge` composes separately
trained subjects without training (Custom Diffusion's constrained optimisation).
"""

from cones.baselines import custom_diffusion, dreambooth, textual_inversion
from cones.baselines.tokens import JointObjective, TokenEmbeddings, TokenObjective
from cones.baselines.weights import METHODS, BaselineWeights, applied_weights, load, save
from cones.patches import applied

TRAIN = {
    "dreambooth": dreambooth.train,
    "custom_diffusion": custom_diffusion.train,
    "textual_inversion": textual_inversion.train,
}

__all__ = [
    "METHODS",
    "TRAIN",
    "BaselineWeights",
    "JointObjective",
    "TokenEmbeddings",
    "TokenObjective",
    "applied",
    "applied_weights",
    "custom_diffusion",
    "dreambooth",
    "load",
    "save",
    "textual_inversion",
]
