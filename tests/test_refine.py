"""Several subjects at once (`cones.refine`), checked against sets and hand-computed gradients.

Concatenation against Python set unions; the refinement, the joint search and the sequential search
against the paper's criterion computed here by autograd (one step of Algorithm 1: M_p = θ ⊙ ∇L(θ), on the
tiny real SD pipeline in float64); overlap statistics against counts made by hand; the Pillow charts
against the pixel geometry they promise.
"""

import pytest
import torch
from PIL import Image

from cones.find import FindConfig, SubjectImages, multi_objective
from cones.neurons import ConceptNeurons
from cones.objective import ConceptObjective, ObjectiveConfig, SumObjective
from cones.overlap import overlap
from cones.plots import bar_chart, heatmap, layer_label
from cones.refine import concatenate, joint_search, parts_of, refine_concepts, sequential_search
from cones.switching import applied_concepts
from cones.targets import parameter_shapes

# -- helpers: the truth the code is checked against -------------------------------------------------


def random_concept(shapes, density, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    mask = {name: torch.rand(shape, generator=g) < density for name, shape in shapes.items()}
    return ConceptNeurons.from_mask(mask, **kw)


def as_sets(concept):
    return {name: set(idx.tolist()) for name, idx in concept.indices.items()}


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def objective(pipe, token, class_word, seed, dtype=None):
    return ConceptObjective.from_pipeline(
        pipe,
        images(3, seed=10 + seed),
        token=token,
        class_word=class_word,
        class_images=images(3, seed=20 + seed),
        config=ObjectiveConfig(seed=seed),
        dtype=dtype,
    )


def hand_scores(loss_fn, unet, names):
    """M_p of one step of Algorithm 1, by autograd on the model as it is: θ ⊙ ∂L/∂θ at step 0."""
    params = dict(unet.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    grads = torch.autograd.grad(loss_fn(0), [params[n] for n in names])
    return {n: (params[n].detach() * g).detach() for n, g in zip(names, grads, strict=True)}


def snapshot(unet):
    return {name: p.detach().clone() for name, p in unet.named_parameters()}


def assert_unchanged(unet, before):
    for name, p in unet.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


@pytest.fixture
def two_subjects(tiny_pipe):
    """The tiny pipeline in float64, a dog (sks) and a cat (xqz) objective, and a concept for each."""
    unet = tiny_pipe.unet.double()
    dog = objective(tiny_pipe, "sks", "dog", seed=0, dtype=torch.float64)
    cat = objective(tiny_pipe, "xqz", "cat", seed=1, dtype=torch.float64)
    shapes = parameter_shapes(unet, "cross")
    a = random_concept(shapes, 0.2, 0, token="sks", class_word="dog")
    b = random_concept(shapes, 0.2, 1, token="xqz", class_word="cat")
    return unet, SumObjective([dog, cat]), a, b


# -- concatenation ------------------------------------------------------------------------------------


def test_concatenation_is_the_set_union_and_keeps_every_identifier(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet, "all")
    a = random_concept(shapes, 0.1, 0, token="sks", class_word="dog")
    b = random_concept(shapes, 0.2, 1, token="xqz", class_word="cat")
    c = random_concept(parameter_shapes(tiny_pipe.unet, "cross"), 0.3, 2, token="vlt", class_word="mug")
    abc = concatenate(a, b, c)
    sa, sb, sc = as_sets(a), as_sets(b), as_sets(c)
    for name, got in as_sets(abc).items():
        assert got == sa[name] | sb[name] | sc.get(name, set()), name
    assert abc.num_neurons == sum(len(s) for s in as_sets(abc).values())
    assert abc.token is None and abc.class_word is None
    expected = [
        {"token": "sks", "class_word": "dog", "num_neurons": a.num_neurons},
        {"token": "xqz", "class_word": "cat", "num_neurons": b.num_neurons},
        {"token": "vlt", "class_word": "mug", "num_neurons": c.num_neurons},
    ]
    assert abc.metadata == {"combined": "concatenation", "parts": expected}
    # A concatenation of concatenations lists single subjects, and is the same set.
    nested = concatenate(concatenate(a, b), c)
    assert parts_of(nested) == expected
    assert all(torch.equal(nested.indices[n], abc.indices[n]) for n in abc.indices)
    assert parts_of(a) == expected[:1]  # a single concept is its own part
    # One identifier for all parts is kept as the concept's token.
    same = concatenate(a, random_concept(shapes, 0.1, 3, token="sks", class_word="dog"))
    assert (same.token, same.class_word) == ("sks", "dog")


def test_concatenation_refuses_concepts_of_another_base_model(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet, "cross")
    a = random_concept(shapes, 0.1, 0, token="sks")
    name = next(iter(shapes))
    other = ConceptNeurons({}, {**shapes, name: (shapes[name][0], shapes[name][1] + 8)}, token="xqz")
    with pytest.raises(ValueError, match=f"shape of `{name}`.*different base models"):
        concatenate(a, other)
    with pytest.raises(ValueError, match="`concepts` is empty"):
        concatenate()


# -- the searches against the criterion computed by hand -------------------------------------------


def test_refinement_keeps_the_union_neurons_whose_joint_score_is_positive(two_subjects):
    unet, joint_loss, a, b = two_subjects
    before = snapshot(unet)
    names = list(a.shapes)
    scores = hand_scores(joint_loss.loss, unet, names)  # θ ⊙ ∇(L_dog + L_cat)
    result = refine_concepts(joint_loss, unet, [a, b], method="alg1", steps=1, lr=1e-3, disable=True)
    assert_unchanged(unet, before)

    sa, sb, got = as_sets(a), as_sets(b), as_sets(result.concept)
    for name in names:
        expected = {i for i in sa[name] | sb[name] if scores[name].view(-1)[i] > 0}
        assert got[name] == expected, name
    union_size = sum(len(sa[n] | sb[n]) for n in names)
    assert 0 < result.concept.num_neurons < union_size  # some neurons conflict, most do not
    assert result.settings["candidates"] == union_size and result.settings["threshold"] == 0.0
    assert result.concept.metadata["combined"] == "refinement"
    assert result.concept.metadata["union_neurons"] == union_size
    kept = [sum(len(s[n] & got[n]) for n in names) for s in (sa, sb)]
    assert [p["kept"] for p in result.concept.metadata["parts"]] == kept
    assert [p["token"] for p in result.concept.metadata["parts"]] == ["sks", "xqz"]
    # Scores outside the union are exactly 0: the rest of the model is not a candidate.
    for name in names:
        outside = torch.ones(scores[name].numel(), dtype=torch.bool)
        outside[list(sa[name] | sb[name])] = False
        assert torch.count_nonzero(result.scores[name].view(-1)[outside]) == 0


def test_refinement_by_share_keeps_the_top_of_the_union(two_subjects):
    unet, joint_loss, a, b = two_subjects
    union_ = concatenate(a, b)
    result = refine_concepts(
        joint_loss, unet, union_, method="alg1", steps=1, lr=1e-3, sparsity=0.25, disable=True
    )
    mask = union_.masks()
    inside = torch.cat([result.scores[n][mask[n]] for n in mask])  # joint scores of the union's neurons
    chosen = result.concept.masks()
    picked = torch.cat([result.scores[n][chosen[n]] for n in chosen])
    left = torch.cat([result.scores[n][mask[n] & ~chosen[n]] for n in mask])
    assert result.concept.num_neurons == min(round(0.25 * union_.num_neurons), int((inside > 0).sum()))
    assert picked.min() > 0 and picked.min() >= left.max()
    assert [p["kept"] for p in result.concept.metadata["parts"]] == [None, None]  # one merged input


def test_joint_search_from_scratch_takes_the_top_scores_with_the_union_budget(two_subjects):
    unet, joint_loss, a, b = two_subjects
    union_ = concatenate(a, b)
    names = list(a.shapes)
    scores = hand_scores(joint_loss.loss, unet, names)
    result = joint_search(joint_loss, unet, [a, b], method="alg1", steps=1, lr=1e-3, disable=True)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    k = min(union_.num_neurons, int((flat > 0).sum()))
    assert result.concept.num_neurons == k
    threshold = flat.topk(k).values.min()
    for name in names:
        expected = set((scores[name].reshape(-1) >= threshold).nonzero().view(-1).tolist())
        assert as_sets(result.concept)[name] == expected, name
    assert result.concept.metadata["combined"] == "joint"
    assert [p["token"] for p in result.concept.metadata["parts"]] == ["sks", "xqz"]
    with pytest.raises(ValueError, match="pass `threshold` or `sparsity`"):
        joint_search(joint_loss, unet, [a, b], targets="all", steps=1, disable=True)


def test_sequential_search_sees_the_learned_concept_shut_and_never_reuses_it(two_subjects):
    unet, joint_loss, learned, _ = two_subjects
    cat = joint_loss.objectives[1]
    before = snapshot(unet)
    names = list(learned.shapes)
    with learned.shut(unet):  # the truth: the criterion on the model with the first subject shut
        scores = hand_scores(cat.loss, unet, names)
    result = sequential_search(
        cat, unet, learned, method="alg1", steps=1, lr=1e-3, threshold=0.0, disable=True
    )
    assert_unchanged(unet, before)
    assert applied_concepts(unet) == []
    for name in names:
        torch.testing.assert_close(result.scores[name], scores[name], rtol=1e-9, atol=1e-15)
        assert torch.count_nonzero(result.scores[name][learned.mask_for(name)]) == 0  # shut weights score 0
        assert as_sets(result.concept)[name] == set(
            (scores[name].reshape(-1) > 0).nonzero().view(-1).tolist()
        )
    assert sum(len(as_sets(learned)[n] & as_sets(result.concept)[n]) for n in names) == 0
    assert (result.concept.token, result.concept.class_word) == ("xqz", "cat")
    assert result.concept.metadata["learned_after"] == parts_of(learned)
    # Without the first subject shut, the criterion differs: the search did see it shut.
    free = hand_scores(cat.loss, unet, names)
    assert any(not torch.allclose(free[n], scores[n]) for n in names)


def test_multi_subject_searches_refuse_a_model_with_concepts_applied(two_subjects):
    unet, joint_loss, a, b = two_subjects
    with a.shut(unet):
        for search in (refine_concepts, joint_search, sequential_search):
            with pytest.raises(ValueError, match="concept\\(s\\) applied"):
                search(joint_loss, unet, [a, b], steps=1, disable=True)


def test_multi_objective_is_the_sum_of_independently_seeded_subject_losses(tiny_pipe):
    config = FindConfig(batch_size=2, num_class_images=4, seed=5)
    subjects = [
        SubjectImages(images(3, 1), "sks", "dog", class_prompts=["a dog", "a red dog"]),
        SubjectImages(
            images(2, 2), "xqz", "cat", class_pictures=[Image.new("RGB", (16, 16), (200, 0, 0))] * 2
        ),
    ]
    total = multi_objective(tiny_pipe, subjects, config)
    dog, cat = total.objectives
    assert (dog.config.seed, cat.config.seed) == (5, 6)  # independent draws per subject
    assert (dog.token, dog.class_word, cat.token, cat.class_word) == ("sks", "dog", "xqz", "cat")
    assert dog.class_prompts == ["a dog", "a dog", "a red dog", "a red dog"]  # 4 images, 2 per prompt
    assert cat.class_prompts == ["a cat"] and cat.class_latents.shape[0] == 2
    with torch.no_grad():
        assert total.loss(3).item() == pytest.approx(dog.loss(3).item() + cat.loss(3).item(), rel=1e-6)
    concept = random_concept(parameter_shapes(tiny_pipe.unet), 0.1, 0)
    with concept.shut(tiny_pipe.unet), pytest.raises(ValueError, match="applied"):
        multi_objective(tiny_pipe, subjects, config)


# -- overlap statistics ---------------------------------------------------------------------------------


def test_overlap_report_against_hand_counts():
    shapes = {"x": (2, 5), "y": (4,)}
    a = ConceptNeurons({"x": [0, 1, 2, 3], "y": [0]}, shapes)
    b = ConceptNeurons({"x": [2, 3, 4, 5, 6]}, shapes)
    report = overlap(a, b)
    assert (report.size_a, report.size_b, report.shared, report.union) == (5, 5, 2, 8)
    assert report.jaccard == pytest.approx(2 / 8)
    assert report.share_of_a == pytest.approx(2 / 5) and report.share_of_b == pytest.approx(2 / 5)
    # chance: |A_x||B_x|/10 + |A_y||B_y|/4 = 4*5/10 + 1*0/4
    assert report.chance == pytest.approx(2.0)
    x, y = report.layers
    assert (x.name, x.weights, x.size_a, x.size_b, x.shared) == ("x", 10, 4, 5, 2)
    assert x.jaccard == pytest.approx(2 / 7) and y.jaccard == 0.0 and y.chance == 0.0
    data = report.to_dict()
    assert data["layers"][0]["chance"] == pytest.approx(2.0) and data["shared"] == 2


def test_random_concepts_share_what_chance_predicts(tiny_pipe):
    shapes = parameter_shapes(tiny_pipe.unet, "all")
    report = overlap(random_concept(shapes, 0.3, 0), random_concept(shapes, 0.2, 1))
    # independent draws: the shared count is hypergeometric around the chance value (sd ~ sqrt(chance))
    assert abs(report.shared - report.chance) < 5 * report.chance**0.5


# -- charts ---------------------------------------------------------------------------------------------


def runs_of(image: Image.Image, colour) -> list[int]:
    """For each pixel row, how many pixels have exactly `colour` (rows with none left out)."""
    width, height = image.size
    px = image.load()
    counts = [sum(px[x, y] == colour for x in range(width)) for y in range(height)]
    return [c for c in counts if c]


def test_bar_lengths_are_proportional_to_the_values():
    red, blue = (200, 10, 10), (10, 10, 200)
    image = bar_chart(
        ["one", "two", "three"],
        {"first": [1.0, 0.25, 0.0], "second": [0.5, 0.5, 0.75]},
        width=200,
        colors=[red, blue],
        title="shares",
    )
    legend = 10  # the legend swatch is one bar height square
    red_rows = sorted(set(c for c in runs_of(image, red) if c > legend))
    blue_rows = sorted(set(c for c in runs_of(image, blue) if c > legend))
    assert red_rows == [50, 200]  # 0.25 and 1.0 of 200 pixels; 0.0 draws nothing
    assert blue_rows == [100, 150]
    capped = bar_chart(["a"], {"s": [3.0]}, maximum=1.0, width=80, colors=[red])
    assert max(runs_of(capped, red)) == 80
    with pytest.raises(ValueError, match="2 values for 3 labels"):
        bar_chart(["a", "b", "c"], {"s": [1, 2]})
    with pytest.raises(ValueError, match="negative"):
        bar_chart(["a"], {"s": [-1.0]})


def test_heatmap_shades_grow_with_the_value():
    image = heatmap([[0.0, 0.5], [1.0, 0.25]], ["r0", "r1"], ["c0", "c1"], cell=40, value_format="")
    px = image.load()
    width, height = image.size
    x0, y0 = width - 8 - 80, height - 8 - 80  # the cells sit in the bottom-right corner, 8 px margin
    shade = {(i, j): px[x0 + j * 40 + 5, y0 + i * 40 + 5] for i in range(2) for j in range(2)}
    brightness = {key: sum(rgb) for key, rgb in shade.items()}
    assert shade[(0, 0)] == (255, 255, 255)
    assert brightness[(0, 0)] > brightness[(1, 1)] > brightness[(0, 1)] > brightness[(1, 0)]


def test_layer_labels_are_short():
    assert (
        layer_label("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight") == "down1.0 attn2.k"
    )
    assert layer_label("up_blocks.3.attentions.2.transformer_blocks.1.attn1.to_v.weight") == "up3.2.1 attn1.v"
    assert layer_label("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight") == "mid.0 attn2.v"
    assert layer_label("conv_in.weight") == "conv_in"
