"""Tuning concept-neuron values at float32 / float16 / quaternary / binary precision, and the values file.

The tuning is checked on a loss whose minimiser is known in closed form: L = Σ (θ_i − t_i)² over the
neurons, with targets t_i = r_i · θ0_i. Float tuning must land on t; quaternary tuning with targets on the
levels {0, 1/3, 2/3, 1} · θ0 must recover exactly those levels (the straight-through estimator and the
clamp to [0, 1] must not push it off them). The packing of 2-bit codes and the file sizes are checked
against bytes worked out by hand.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cones.fingerprint import concept_fingerprint
from cones.neurons import ConceptNeurons
from cones.objective import ConceptObjective, ObjectiveConfig
from cones.precision import (
    PRECISIONS,
    TunedConcept,
    ValuesFileError,
    load_values,
    pack_codes,
    tune_values,
    unpack_codes,
    values_bytes,
)
from cones.search import select_neurons
from cones.storage import ConceptFileError, load_concept_file
from cones.targets import target_parameters


def make_concept(unet, sparsity=0.05, seed=0) -> ConceptNeurons:
    g = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(p.shape, generator=g) for name, p in target_parameters(unet, "cross").items()}
    return ConceptNeurons.from_mask(select_neurons(scores, sparsity=sparsity), token="sks", class_word="dog")


def state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Quadratic:
    """L = Σ_names Σ_i (θ[idx_i] − t_i)², t_i = ratio_i · θ0_i: minimised exactly at θ = t."""

    def __init__(self, unet, concept: ConceptNeurons, ratios: dict[str, torch.Tensor]) -> None:
        self.unet, self.concept = unet, concept
        self.targets = {}
        for name, idx in concept.indices.items():
            if idx.numel():
                theta0 = unet.get_parameter(name).detach().view(-1)[idx]
                self.targets[name] = ratios[name] * theta0

    def loss(self, step: int) -> torch.Tensor:
        total = torch.zeros(())
        for name, t in self.targets.items():
            w = self.unet.get_parameter(name).view(-1)[self.concept.indices[name]]
            total = total + ((w - t) ** 2).sum()
        return total


def ratios_for(concept: ConceptNeurons, draw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {name: draw(idx.numel(), g) for name, idx in concept.indices.items() if idx.numel()}


# -- the packing of quaternary codes ------------------------------------------------------------------


def test_pack_codes_by_hand():
    # byte 0: 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 57; byte 1: 3 and three zero padding codes = 3
    codes = torch.tensor([1, 2, 3, 0, 3], dtype=torch.uint8)
    assert pack_codes(codes).tolist() == [57, 3]
    assert unpack_codes(np.array([57, 3], dtype=np.uint8), 5).tolist() == [1, 2, 3, 0, 3]
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(np.array([57, 3 | (1 << 6)], dtype=np.uint8), 5)
    with pytest.raises(ValueError, match="0..3"):
        pack_codes(torch.tensor([4], dtype=torch.uint8))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=50))
def test_pack_unpack_round_trip(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_codes(t)
    assert packed.size == math.ceil(len(codes) / 4)
    assert torch.equal(unpack_codes(packed, len(codes)), t)


def test_values_bytes_by_hand():
    assert [values_bytes(p, 10) for p in PRECISIONS] == [40, 20, 3, 0]
    with pytest.raises(ValueError, match="`precision`"):
        values_bytes("int8", 10)


# -- tuning on a loss with a known minimiser ----------------------------------------------------------


def test_float32_tuning_lands_on_the_minimiser(tiny_pipe):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    ratios = ratios_for(concept, lambda n, g: torch.rand(n, generator=g) * 1.6 - 0.3)  # in [-0.3, 1.3]
    objective = Quadratic(unet, concept, ratios)
    before = state(unet)
    result = tune_values(objective, unet, concept, precision="float32", steps=400, lr=0.02, disable=True)
    assert bit_equal(state(unet), before)  # tuning leaves the UNet as it was
    assert result.losses[-1] < 1e-3 * result.losses[0]
    for name, t in objective.targets.items():
        theta0 = before[name].view(-1)[concept.indices[name]]
        value = result.tuned.values[name]
        assert value.dtype == torch.float32
        assert torch.all((value - t).abs() <= 0.02 * theta0.abs() + 1e-7), name


def test_float16_values_are_float16_and_near_the_minimiser(tiny_pipe):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    ratios = ratios_for(concept, lambda n, g: torch.rand(n, generator=g))
    objective = Quadratic(unet, concept, ratios)
    result = tune_values(objective, unet, concept, precision="float16", steps=400, lr=0.02, disable=True)
    for name, t in objective.targets.items():
        value = result.tuned.values[name]
        assert value.dtype == torch.float16
        theta0 = unet.get_parameter(name).detach().view(-1)[concept.indices[name]]
        assert torch.all((value.float() - t).abs() <= 0.02 * theta0.abs() + 1e-3 * t.abs() + 1e-6), name


def test_quaternary_tuning_recovers_the_levels(tiny_pipe):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    levels = ratios_for(concept, lambda n, g: torch.randint(0, 4, (n,), generator=g).float())
    objective = Quadratic(unet, concept, {name: lv / 3 for name, lv in levels.items()})
    result = tune_values(objective, unet, concept, precision="quaternary", steps=200, lr=0.02, disable=True)
    for name, lv in levels.items():
        assert result.tuned.values[name].dtype == torch.uint8
        assert torch.equal(result.tuned.values[name].long(), lv.long()), name
    # Applied, the weights are code/3 · θ0 at the neurons and untouched elsewhere.
    before = state(unet)
    with result.tuned.applied(unet):
        for name, lv in levels.items():
            idx = concept.indices[name]
            theta0 = before[name].view(-1)[idx].double()
            now = unet.get_parameter(name).detach().view(-1)
            assert torch.allclose(now[idx].double(), lv.double() / 3 * theta0, rtol=1e-6, atol=0)
            rest = torch.ones(now.numel(), dtype=torch.bool)
            rest[idx] = False
            assert torch.equal(now[rest], before[name].view(-1)[rest])
    assert bit_equal(state(unet), before)


def test_binary_is_shutting_without_tuning(tiny_pipe):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    objective = Quadratic(unet, concept, ratios_for(concept, lambda n, g: torch.zeros(n)))
    result = tune_values(objective, unet, concept, precision="binary", disable=True)
    assert result.losses == [] and result.tuned.values == {} and result.tuned.values_bytes == 0
    with concept.shut(unet):
        shut = state(unet)
    before = state(unet)
    with result.tuned.applied(unet):
        assert bit_equal(state(unet), shut)
    assert bit_equal(state(unet), before)


def test_tuning_a_real_objective_is_deterministic_and_restores(tiny_pipe):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    objective = ConceptObjective.from_pipeline(
        tiny_pipe, images, token="sks", class_word="dog", config=ObjectiveConfig(batch_size=2)
    )
    unet = tiny_pipe.unet
    concept = make_concept(unet, sparsity=0.02)
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    before = state(unet)
    runs = [
        tune_values(objective, unet, concept, precision="float16", steps=4, disable=True) for _ in range(2)
    ]
    assert bit_equal(state(unet), before)
    assert flags == {n: p.requires_grad for n, p in unet.named_parameters()}
    assert runs[0].losses == runs[1].losses and all(math.isfinite(x) for x in runs[0].losses)
    assert all(torch.equal(runs[0].tuned.values[n], runs[1].tuned.values[n]) for n in runs[0].tuned.values)
    # Step 0 is evaluated at the shut state (ξ = 0): its loss is the loss with the concept shut.
    with concept.shut(unet), torch.no_grad():
        assert objective.loss(0).item() == pytest.approx(runs[0].losses[0], rel=1e-6)


# -- applying, files ----------------------------------------------------------------------------------


def test_apply_refuses_mixing_and_remove_needs_apply(tiny_pipe):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    tuned = TunedConcept(concept, "binary")
    with pytest.raises(ValueError, match="not applied"):
        tuned.remove(unet)
    with concept.shut(unet), pytest.raises(ValueError, match="shut"):
        tuned.apply(unet)
    with tuned.applied(unet), pytest.raises(ValueError, match="already applied"):
        TunedConcept(concept, "binary").apply(unet)


@pytest.mark.parametrize("precision", ["float32", "float16", "quaternary"])
def test_values_file_round_trip_and_size(tiny_pipe, tmp_path, precision):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    g = torch.Generator().manual_seed(3)
    values = {}
    for name, idx in concept.indices.items():
        if idx.numel():
            if precision == "quaternary":
                values[name] = torch.randint(0, 4, (idx.numel(),), generator=g).to(torch.uint8)
            else:
                values[name] = torch.randn(idx.numel(), generator=g).to(getattr(torch, precision))
    tuned = TunedConcept(concept, precision, values, metadata={"tune": {"steps": 3}})
    path = tmp_path / "dog.cones-values"
    tuned.save(path)
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    # the tensors are exactly the values: 4 or 2 bytes per neuron, or ⌈n/4⌉ bytes per parameter
    per_parameter = {
        "float32": lambda n: 4 * n,
        "float16": lambda n: 2 * n,
        "quaternary": lambda n: math.ceil(n / 4),
    }[precision]
    assert len(data) - 8 - header == sum(per_parameter(v.numel()) for v in values.values())
    loaded = load_values(path, concept)
    assert loaded.precision == precision and loaded.metadata == {"tune": {"steps": 3}}
    assert all(torch.equal(loaded.values[n], values[n]) for n in values)
    with pytest.raises(FileExistsError, match="overwrite"):
        tuned.save(path)
    # not a .cones file, and a .cones reader says so instead of misreading it
    with pytest.raises(ConceptFileError, match="not a .cones file"):
        load_concept_file(path)


def test_values_file_refuses_another_concept_and_damage(tiny_pipe, tmp_path):
    unet = tiny_pipe.unet
    concept, other = make_concept(unet, seed=0), make_concept(unet, seed=1)
    assert concept_fingerprint(concept) != concept_fingerprint(other)
    values = {n: torch.zeros(i.numel()) for n, i in concept.indices.items() if i.numel()}
    path = tmp_path / "v.cones-values"
    TunedConcept(concept, "float32", values).save(path)
    with pytest.raises(ValuesFileError, match="another concept"):
        load_values(path, other)
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) - 5])
    with pytest.raises(ValuesFileError, match="cannot read"):
        load_values(tmp_path / "cut", concept)
    concept.save(tmp_path / "c.cones")
    with pytest.raises(ValuesFileError, match="not a .cones-values file"):
        load_values(tmp_path / "c.cones", concept)


def test_bad_arguments_name_themselves(tiny_pipe):
    unet = tiny_pipe.unet
    concept = make_concept(unet)
    objective = Quadratic(unet, concept, ratios_for(concept, lambda n, g: torch.zeros(n)))
    with pytest.raises(ValueError, match="`precision`"):
        tune_values(objective, unet, concept, precision="int4")
    with pytest.raises(ValueError, match="`init`"):
        tune_values(objective, unet, concept, init="random")
    with pytest.raises(ValueError, match="`values"):
        TunedConcept(
            concept, "float16", {n: torch.zeros(i.numel()) for n, i in concept.indices.items() if i.numel()}
        )
