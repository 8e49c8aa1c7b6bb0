import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import make_tiny_pipeline

from cones.neurons import ConceptNeurons, intersection, union
from cones.overlap import overlap
from cones.patches import applied
from cones.search import select_neurons
from cones.switching import applied_concepts
from cones.targets import parameter_shapes, target_parameters

# -- helpers: the truth the code is checked against -------------------------------------------------


def random_concept(shapes, density, seed, **kw):
    """Each weight is a neuron with probability `density`, independently."""
    g = torch.Generator().manual_seed(seed)
    mask = {name: torch.rand(shape, generator=g) < density for name, shape in shapes.items()}
    return ConceptNeurons.from_mask(mask, **kw)


def as_sets(concept):
    return {name: set(idx.tolist()) for name, idx in concept.indices.items()}


def bits(t):
    """The raw bits of a float tensor, so that NaN, -0.0 and subnormals compare exactly."""
    return t.detach().view({torch.float32: torch.int32, torch.float16: torch.int16}[t.dtype]).clone()


def snapshot(unet):
    return {name: bits(p) for name, p in unet.named_parameters()}


def assert_state(unet, original, active):
    """Exactly the union of `active` is zero; every other weight has its original bits."""
    shut_sets = {}
    for concept in active:
        for name, s in as_sets(concept).items():
            shut_sets.setdefault(name, set()).update(s)
    for name, p in unet.named_parameters():
        expected = original[name].clone().view(-1)
        if shut_sets.get(name):
            expected[torch.tensor(sorted(shut_sets[name]))] = bits(torch.zeros((), dtype=p.dtype))
        assert torch.equal(bits(p).view(-1), expected), name


@pytest.fixture(scope="module")
def shared_pipe(tmp_path_factory):
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("tiny")))


# -- construction -----------------------------------------------------------------------------------


def test_from_mask_indices_are_the_flat_true_positions(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet, "all")
    g = torch.Generator().manual_seed(0)
    mask = {name: torch.rand(shape, generator=g) < 0.1 for name, shape in shapes.items()}
    concept = ConceptNeurons.from_mask(mask, token="sks", class_word="dog", metadata={"search": {"tau": 0.1}})
    for name, m in mask.items():
        expected = [i for i, v in enumerate(m.reshape(-1).tolist()) if v]
        assert concept.indices[name].tolist() == expected
        assert concept.indices[name].dtype == torch.int64
        assert torch.equal(concept.mask_for(name), m)
    assert concept.shapes == shapes
    assert concept.num_neurons == sum(int(m.sum()) for m in mask.values())
    assert concept.sparsity == concept.num_neurons / sum(m.numel() for m in mask.values())
    assert concept.per_layer_sparsity() == {n: m.sum().item() / m.numel() for n, m in mask.items()}
    assert (
        ConceptNeurons.from_mask(concept.masks(), token="sks", class_word="dog", metadata=concept.metadata)
        == concept
    )


def test_from_mask_keeps_full_shapes_for_partial_masks(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet, "all")
    first = next(iter(shapes))
    concept = ConceptNeurons.from_mask({first: torch.ones(shapes[first], dtype=torch.bool)}, shapes=shapes)
    assert concept.shapes == shapes
    assert list(concept.indices) == list(shapes)
    assert concept.num_neurons == math.prod(shapes[first])
    assert all(concept.indices[n].numel() == 0 for n in list(shapes)[1:])


def test_constructor_validates_indices():
    shapes = {"a.weight": (4, 4)}
    with pytest.raises(ValueError, match="sorted and unique"):
        ConceptNeurons({"a.weight": torch.tensor([3, 1])}, shapes)
    with pytest.raises(ValueError, match="sorted and unique"):
        ConceptNeurons({"a.weight": torch.tensor([1, 1])}, shapes)
    with pytest.raises(ValueError, match=r"16, outside \[0, 16\)"):
        ConceptNeurons({"a.weight": torch.tensor([0, 16])}, shapes)
    with pytest.raises(ValueError, match="-1"):
        ConceptNeurons({"a.weight": torch.tensor([-1, 2])}, shapes)
    with pytest.raises(ValueError, match="integer tensor"):
        ConceptNeurons({"a.weight": torch.tensor([1.0])}, shapes)
    with pytest.raises(ValueError, match="not in `shapes`"):
        ConceptNeurons({"b.weight": torch.tensor([1])}, shapes)
    with pytest.raises(ValueError, match="non-negative ints"):
        ConceptNeurons({}, {"a.weight": (4, -1)})


# -- set algebra ------------------------------------------------------------------------------------


def test_union_and_intersection_match_python_sets(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet, "all")
    concepts = [random_concept(shapes, d, seed) for seed, d in enumerate((0.05, 0.2, 0.5))]
    sets = [as_sets(c) for c in concepts]
    u, i = union(*concepts), intersection(*concepts)
    for name in shapes:
        assert set(u.indices[name].tolist()) == set().union(*(s[name] for s in sets))
        assert set(i.indices[name].tolist()) == set.intersection(*(s[name] for s in sets))
        assert u.indices[name].tolist() == sorted(u.indices[name].tolist())
    assert concepts[0] | concepts[1] == union(concepts[0], concepts[1])
    assert concepts[0] & concepts[1] == concepts[0].intersection(concepts[1])
    assert union(concepts[0]) == ConceptNeurons(
        concepts[0].indices,
        shapes,
        metadata={
            "combined": "union",
            "parts": [{"token": None, "class_word": None, "num_neurons": concepts[0].num_neurons}],
        },
    )


def test_union_merges_different_target_sets_and_rejects_other_models(tiny_pipe):
    unet = tiny_pipe.unet
    cross = random_concept(parameter_shapes(unet, "cross"), 0.1, 0, token="sks")
    self_ = random_concept(parameter_shapes(unet, "self"), 0.1, 1, token="xqz")
    both = cross | self_
    assert set(both.shapes) == set(parameter_shapes(unet, "all"))
    assert both.num_neurons == cross.num_neurons + self_.num_neurons
    assert both.token is None
    assert [p["token"] for p in both.metadata["parts"]] == ["sks", "xqz"]
    assert (cross & self_).num_neurons == 0
    name = next(iter(cross.shapes))
    other = ConceptNeurons({}, {name: (3, 3)})
    with pytest.raises(ValueError, match=f"shape of `{name}`"):
        cross | other


def test_overlap_statistics(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet)
    a, b = random_concept(shapes, 0.3, 0), random_concept(shapes, 0.1, 1)
    sa, sb = as_sets(a), as_sets(b)
    stats = overlap(a, b)
    shared = sum(len(sa[n] & sb[n]) for n in shapes)
    assert (stats.shared, stats.size_a, stats.size_b) == (shared, a.num_neurons, b.num_neurons)
    assert stats.jaccard == pytest.approx(shared / sum(len(sa[n] | sb[n]) for n in shapes))
    assert stats.share_of_a == pytest.approx(shared / a.num_neurons)
    assert stats.share_of_b == pytest.approx(shared / b.num_neurons)
    for n in shapes:
        assert stats.per_layer[n].shared == len(sa[n] & sb[n])
    assert overlap(a, a).jaccard == 1.0
    empty = ConceptNeurons({}, shapes)
    assert overlap(empty, empty).jaccard == 0.0


# -- the model --------------------------------------------------------------------------------------


def test_check_compatible_names_the_first_mismatching_parameter(tiny_pipe):
    unet = tiny_pipe.unet
    shapes = parameter_shapes(unet, "all")
    concept = random_concept(shapes, 0.1, 0)
    concept.check_compatible(unet)

    names = list(shapes)
    wrong = dict(shapes)
    wrong[names[2]] = (7, 7)
    wrong[names[5]] = (9, 9)
    with pytest.raises(
        ValueError,
        match=rf"parameter `{names[2]}` has shape \(16, 32\) in the UNet2DConditionModel but \(7, 7\)",
    ):
        ConceptNeurons({}, wrong).apply(unet)
    original = snapshot(unet)
    missing = {"down_blocks.9.attn2.to_k.weight": (4, 4), **shapes}
    with pytest.raises(ValueError, match=r"`down_blocks\.9\.attn2\.to_k\.weight` .* is missing"):
        ConceptNeurons({}, missing).apply(unet)
    assert_state(unet, original, [])  # a failed apply touches nothing


def test_concept_for_another_base_model_fails_clearly(tiny_pipe, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**tiny_pipe.unet.config, "cross_attention_dim": 24})
    concept = random_concept(parameter_shapes(tiny_pipe.unet), 0.1, 0)
    first = next(iter(concept.shapes))
    with pytest.raises(ValueError, match=rf"`{first}` has shape \(16, 24\) .* another base model"):
        concept.apply(other)


def test_apply_zeroes_exactly_and_remove_restores_bits(tiny_pipe):
    unet = tiny_pipe.unet
    concept = random_concept(parameter_shapes(unet, "all"), 0.2, 0)
    original = snapshot(unet)
    concept.apply(unet)
    assert applied_concepts(unet) == [concept]
    assert_state(unet, original, [concept])
    concept.remove(unet)
    assert_state(unet, original, [])
    assert applied_concepts(unet) == []
    assert not hasattr(unet, "_cones_switching")
    with pytest.raises(ValueError, match="not applied"):
        concept.remove(unet)


def test_special_values_come_back_bit_for_bit(tiny_pipe):
    unet = tiny_pipe.unet
    params = target_parameters(unet)
    with torch.no_grad():
        for p in params.values():
            p.view(-1)[:6] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-40])
    concept = ConceptNeurons({n: torch.arange(8) for n in params}, parameter_shapes(unet))
    other = ConceptNeurons({n: torch.arange(0, 8, 2) for n in params}, parameter_shapes(unet))
    original = snapshot(unet)
    with applied(unet, concept, other):
        assert_state(unet, original, [concept, other])
    assert_state(unet, original, [])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=4),
    steps=st.lists(st.tuples(st.booleans(), st.integers(0, 2**16)), min_size=1, max_size=12),
    drain_seed=st.integers(0, 2**16),
)
def test_any_apply_remove_order_keeps_exactly_the_union_shut(shared_pipe, seeds, steps, drain_seed):
    """Overlapping concepts, applied and removed in random order (a concept may be active twice)."""
    unet = shared_pipe.unet
    shapes = parameter_shapes(unet, "all")
    # A shared block of neurons makes the overlaps large, on top of the random ones.
    block = ConceptNeurons({n: torch.arange(0, 64, 3) for n in list(shapes)[::2]}, shapes)
    concepts = [random_concept(shapes, 0.15, s) | block for s in seeds]
    original = snapshot(unet)
    active = []
    try:
        for remove, pick in steps:
            if remove and active:
                active.pop(pick % len(active)).remove(unet)
            else:
                concept = concepts[pick % len(concepts)]
                concept.apply(unet)
                active.append(concept)
            assert_state(unet, original, active)
        random.Random(drain_seed).shuffle(active)
        while active:
            active.pop().remove(unet)
        assert_state(unet, original, [])
        assert not hasattr(unet, "_cones_switching")
    finally:  # the next example starts from the original weights whatever happened here
        unet.__dict__.pop("_cones_switching", None)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                p.detach().view(original[name].dtype).copy_(original[name])


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_switching_works_in_every_autograd_mode(tiny_pipe, mode):
    unet = tiny_pipe.unet
    assert all(p.requires_grad for p in unet.parameters())
    a, b = (random_concept(parameter_shapes(unet, "all"), 0.2, s) for s in (0, 1))
    original = snapshot(unet)
    contexts = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    with contexts[mode]():
        a.apply(unet)
        b.apply(unet)
        a.remove(unet)
        assert_state(unet, original, [b])
        b.remove(unet)
    assert_state(unet, original, [])


def test_switching_fp16_weights(tiny_pipe):
    unet = tiny_pipe.unet.half()
    a, b = (random_concept(parameter_shapes(unet, "all"), 0.3, s) for s in (0, 1))
    original = snapshot(unet)
    for first, second in ((a, b), (b, a)):
        a.apply(unet)
        b.apply(unet)
        assert_state(unet, original, [a, b])
        first.remove(unet)
        assert_state(unet, original, [second])
        second.remove(unet)
        assert_state(unet, original, [])


@pytest.mark.gpu
def test_switching_on_cuda(tiny_pipe):
    unet = tiny_pipe.unet.to("cuda")
    a, b = (random_concept(parameter_shapes(unet, "all"), 0.3, s) for s in (0, 1))
    original = {n: t.cpu() for n, t in snapshot(unet).items()}
    a.apply(unet)
    b.apply(unet)
    a.remove(unet)
    unet.to("cpu")  # the saved values follow the weights to their new device
    assert_state(unet, original, [b])
    b.remove(unet)
    assert_state(unet, original, [])


def test_shut_restores_after_an_exception(tiny_pipe):
    unet = tiny_pipe.unet
    concept = random_concept(parameter_shapes(unet), 0.2, 0)
    original = snapshot(unet)
    with pytest.raises(RuntimeError, match="boom"), concept.shut(unet):
        assert_state(unet, original, [concept])
        raise RuntimeError("boom")
    assert_state(unet, original, [])


def test_remove_matches_by_value_and_uses_the_indices_it_applied(tiny_pipe):
    unet = tiny_pipe.unet
    shapes = parameter_shapes(unet)
    concept = random_concept(shapes, 0.2, 0)
    original = snapshot(unet)
    concept.apply(unet)
    copy = ConceptNeurons(dict(concept.indices), shapes)  # equal, e.g. the same file loaded twice
    copy.remove(unet)
    assert_state(unet, original, [])
    concept.apply(unet)
    concept.indices = {}  # edited while applied: remove still undoes what was applied
    concept.remove(unet)
    assert_state(unet, original, [])


class _KV(torch.nn.Module):
    """The 32 cross-attention key/value matrices of a Stable Diffusion 1.x UNet."""

    def __init__(self):
        super().__init__()
        channels = [320, 320, 640, 640, 1280, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3
        self.layers = torch.nn.ModuleList(torch.nn.Linear(768, c, bias=False) for c in channels for _ in "kv")


@pytest.mark.parametrize("sparsity", [0.0132, 0.08])
def test_switching_edits_sd_sized_weights_in_place_and_keeps_only_the_shut_values(sparsity):
    # What makes switching cheap (its time is measured in benchmarks/bench_switching.py): the weights are
    # edited where they lie, and only the values of the shut neurons are kept, never a copy of the weights.
    from cones.switching import _REGISTRY_ATTR

    kv = _KV()
    before = {n: p.detach().clone() for n, p in kv.named_parameters()}
    storage = {n: p.data_ptr() for n, p in kv.named_parameters()}
    scores = {n: torch.rand(p.shape) for n, p in before.items()}
    concept = ConceptNeurons.from_mask(select_neurons(scores, sparsity=sparsity))
    concept.apply(kv)
    saved = kv.__dict__[_REGISTRY_ATTR].saved
    assert sum(s.original.numel() for s in saved.values()) == concept.num_neurons
    assert concept.sparsity == pytest.approx(sparsity, rel=1e-3)
    for name, p in kv.named_parameters():
        assert p.data_ptr() == storage[name]
        assert torch.equal(
            p.detach().view(-1)[concept.indices[name]], torch.zeros(concept.indices[name].numel())
        )
    concept.remove(kv)
    assert _REGISTRY_ATTR not in kv.__dict__
    assert all(torch.equal(p, before[n]) and p.data_ptr() == storage[n] for n, p in kv.named_parameters())


def test_repr_is_short(tiny_pipe):
    concept = random_concept(parameter_shapes(tiny_pipe.unet), 0.5, 0, token="sks")
    assert len(repr(concept)) < 200 and "sks" in repr(concept)
