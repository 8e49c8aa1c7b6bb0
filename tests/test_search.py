"""The concept-neuron search against the paper's mathematics.

On a least-squares problem L_k(θ) = ½‖Aθ + o − b_k‖², whose gradient Aᵀ(Aθ + o − b_k) is known in closed
form, Algorithm 1 and Algorithm A2 are computed by hand in float64 and compared with the search. On the
tiny real SD pipeline: Theorem 3.1 (scaling down weights with θ·∂L/∂θ > 0 lowers the loss, to first
order by ε·Σ θ·∂L/∂θ), determinism, exact restoration of the UNet, resume after an interruption (also of a
killed process), and the non-finite guard.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from torch import nn

from cones.neurons import ConceptNeurons
from cones.objective import ConceptObjective, ObjectiveConfig, SumObjective, step_generator
from cones.search import SearchError, SearchProgress, find_concept_neurons, select_neurons

TESTS = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------------
# A problem with a closed-form gradient, behind the same interface as a UNet and its objective.


class Toy(nn.Module):
    """θ (the target, named `weight`) and an offset o that the loss uses but the search must not touch."""

    def __init__(self, theta0: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(theta0.clone())
        self.offset = nn.Parameter(offset.clone())


class LeastSquares:
    """L_k(θ) = ½‖Aθ + o − b_k‖² with b_k = b + noise drawn from (seed, k), so each step differs."""

    def __init__(self, model: Toy, A: torch.Tensor, b: torch.Tensor, seed: int = 0) -> None:
        self.model, self.A, self.b, self.seed = model, A, b, seed

    def b_at(self, step: int) -> torch.Tensor:
        return self.b + 0.3 * torch.randn(
            self.b.shape, generator=step_generator(self.seed, step), dtype=self.b.dtype
        )

    def loss(self, step: int) -> torch.Tensor:
        r = self.A @ self.model.weight + self.model.offset - self.b_at(step)
        return 0.5 * (r * r).sum()

    def grad_at(self, theta: torch.Tensor, step: int) -> torch.Tensor:
        """∇_θ L_k = Aᵀ(Aθ + o − b_k), in float64."""
        A, o = self.A.double(), self.model.offset.detach().double()
        return A.T @ (A @ theta + o - self.b_at(step).double())


def least_squares(dtype=torch.float32, seed: int = 0) -> tuple[Toy, LeastSquares]:
    g = torch.Generator().manual_seed(123)
    n, m = 12, 8
    A = torch.randn(m, n, generator=g, dtype=dtype) / 2
    theta0 = torch.randn(n, generator=g, dtype=dtype)
    b = torch.randn(m, generator=g, dtype=dtype) * 2
    model = Toy(theta0, torch.randn(m, generator=g, dtype=dtype) / 4)
    return model, LeastSquares(model, A, b, seed)


def algorithm1_by_hand(obj: LeastSquares, steps: int, rho: float, candidates=None) -> torch.Tensor:
    """M_p = Σ_k θ_k ⊙ ∇L(θ_k) with θ_1 = θ, θ_{k+1} = θ_k ⊙ (1 − ρ θ_k ⊙ ∇L(θ_k)) (eq. 11)."""
    theta = obj.model.weight.detach().double().clone()
    mp = torch.zeros_like(theta)
    for k in range(steps):
        g = obj.grad_at(theta, k)
        if candidates is not None:
            g = g * candidates
        mp += theta * g
        theta = theta * (1 - rho * theta * g)
    return mp


def a2_sgd_by_hand(obj: LeastSquares, steps: int, rho: float) -> torch.Tensor:
    """K steps ξ ← ξ − ρ θ0 ⊙ ∇L(ξ ⊙ θ0) from ξ = 1 (eqs. A13, A15); M_p = (1 − ξ_K)/ρ."""
    theta0 = obj.model.weight.detach().double().clone()
    xi = torch.ones_like(theta0)
    for k in range(steps):
        xi = xi - rho * theta0 * obj.grad_at(xi * theta0, k)
    return (1 - xi) / rho


def a2_adam_reference(obj: LeastSquares, steps: int, rho: float) -> torch.Tensor:
    """Algorithm A2 with `torch.optim.Adam` on ξ itself (float64); M_p = (1 − ξ_K)/ρ."""
    theta0 = obj.model.weight.detach().double().clone()
    A, o = obj.A.double(), obj.model.offset.detach().double()
    xi = nn.Parameter(torch.ones_like(theta0))
    opt = torch.optim.Adam([xi], lr=rho)
    for k in range(steps):
        r = A @ (xi * theta0) + o - obj.b_at(k).double()
        opt.zero_grad()
        (0.5 * (r * r).sum()).backward()
        opt.step()
    return (1 - xi.detach()) / rho


def search(obj, model, **kwargs):
    """The search on the toy problem; by default selects half of the weights."""
    if "threshold" not in kwargs and "sparsity" not in kwargs:
        kwargs["sparsity"] = 0.5
    kwargs = {"targets": ["weight"], "disable": True, **kwargs}
    return find_concept_neurons(obj, model, **kwargs)


def test_algorithm1_scores_are_the_papers_formula():
    model, obj = least_squares()
    result = search(obj, model, method="alg1", steps=6, lr=0.05, threshold=0.0)
    expected = algorithm1_by_hand(obj, steps=6, rho=0.05)
    torch.testing.assert_close(result.scores["weight"].double(), expected, rtol=1e-4, atol=1e-5)
    # M = 1 − (M_p > τ): the concept neurons are exactly the weights with M_p > τ.
    tau = expected.sort().values[8].item() / 2 + expected.sort().values[9].item() / 2
    result = search(obj, model, method="alg1", steps=6, lr=0.05, threshold=tau)
    assert result.concept.indices["weight"].tolist() == (expected > tau).nonzero().flatten().tolist()
    assert 0 < result.concept.num_neurons < 12


def test_a2_with_sgd_is_gradient_descent_on_xi():
    model, obj = least_squares()
    result = search(obj, model, method="a2", optimizer="sgd", steps=6, lr=0.05)
    torch.testing.assert_close(
        result.scores["weight"].double(), a2_sgd_by_hand(obj, 6, 0.05), rtol=1e-4, atol=1e-5
    )


def test_a2_with_adam_is_torch_adam_on_xi():
    model, obj = least_squares()
    result = search(obj, model, method="a2", steps=8, lr=0.01)
    torch.testing.assert_close(
        result.scores["weight"].double(), a2_adam_reference(obj, 8, 0.01), rtol=1e-4, atol=1e-4
    )
    # With Adam, M_p counts steps: no weight moves by more than about ρ per step.
    assert result.scores["weight"].abs().max() <= 8 * 1.01


def test_a2_approaches_algorithm1_as_the_rate_shrinks():
    # Appendix A.2: (1 − ξ_K)/ρ → Σ_k θ_k ⊙ ∇L(θ_k) as ρ → 0; the gap is first order in ρ.
    model, obj = least_squares()
    gaps = {}
    for rho in (1e-3, 1e-4):
        alg1 = search(obj, model, method="alg1", steps=10, lr=rho, sparsity=0.25)
        a2 = search(obj, model, method="a2", optimizer="sgd", steps=10, lr=rho, sparsity=0.25)
        scale = alg1.scores["weight"].abs().max()
        gaps[rho] = ((a2.scores["weight"] - alg1.scores["weight"]).abs().max() / scale).item()
    assert 0 < gaps[1e-4] < gaps[1e-3] / 5
    assert gaps[1e-4] < 1e-2
    assert torch.equal(a2.concept.indices["weight"], alg1.concept.indices["weight"])
    assert a2.concept.num_neurons == 3  # round(0.25 · 12)


def test_restrict_to_keeps_the_search_inside_the_given_neurons():
    model, obj = least_squares()
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[0, 2, 3, 5, 7, 8, 11]] = True
    restrict = ConceptNeurons.from_mask({"weight": allowed})
    result = search(obj, model, method="alg1", steps=5, lr=0.05, sparsity=1.0, restrict_to=restrict)
    expected = algorithm1_by_hand(obj, steps=5, rho=0.05, candidates=allowed.double())
    torch.testing.assert_close(result.scores["weight"].double(), expected, rtol=1e-4, atol=1e-5)
    assert (result.scores["weight"][~allowed] == 0).all()
    chosen = result.concept.mask_for("weight")
    assert not (chosen & ~allowed).any()
    assert chosen.sum() == (expected > 0).sum()  # sparsity 1.0: every candidate with a positive score
    assert result.settings["candidates"] == 7


def test_toy_model_is_restored_and_non_targets_stay_frozen():
    model, obj = least_squares()
    model.offset.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    result = search(
        obj,
        model,
        method="alg1",
        steps=4,
        lr=0.5,
        callback=lambda p: seen.append((p, model.offset.requires_grad, model.weight.requires_grad)),
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.offset.requires_grad and model.offset.grad is None and model.weight.grad is None
    assert [s[0] for s in seen] == [SearchProgress(step=k, steps=4, loss=result.losses[k]) for k in range(4)]
    assert all(not offset_grad and weight_grad for _, offset_grad, weight_grad in seen)


# ---------------------------------------------------------------------------------------------------
# Selection by τ or by sparsity.

SCORES = {"a": torch.tensor([[0.5, -1.0], [2.0, 0.0]]), "b": torch.tensor([3.0, 0.5, -2.0])}


def test_threshold_selects_scores_above_tau():
    masks = select_neurons(SCORES, threshold=0.4)
    assert masks["a"].tolist() == [[True, False], [True, False]]
    assert masks["b"].tolist() == [True, True, False]
    assert not select_neurons(SCORES, threshold=0.0)["a"][1, 1]  # M_p = 0 is not > 0


def test_sparsity_selects_the_top_positive_scores_jointly():
    # 3 of 7 weights: 3.0, 2.0, then the first of the two 0.5s in parameter order.
    masks = select_neurons(SCORES, sparsity=3 / 7)
    assert masks["a"].tolist() == [[True, False], [True, False]] and masks["b"].tolist() == [
        True,
        False,
        False,
    ]
    # All 7 asked for, but only the 4 positive scores qualify.
    masks = select_neurons(SCORES, sparsity=1.0)
    assert sum(int(m.sum()) for m in masks.values()) == 4 and not masks["a"][1, 1]
    # Sparsity of 2 candidates (e.g. a restricted search): the 2 best.
    masks = select_neurons(SCORES, sparsity=1.0, num_candidates=2)
    assert masks["a"].tolist() == [[False, False], [True, False]] and masks["b"].tolist() == [
        True,
        False,
        False,
    ]


def test_threshold_is_strictly_greater_in_every_parameter():
    scores = {"a.weight": torch.tensor([[0.5, 1.0], [2.0, -1.0]]), "b.weight": torch.tensor([1.0, 3.0])}
    concept = ConceptNeurons.from_mask(select_neurons(scores, threshold=1.0))
    assert concept.indices["a.weight"].tolist() == [2]
    assert concept.indices["b.weight"].tolist() == [1]


@pytest.mark.parametrize("sparsity", [0.013, 0.08, 0.5, 1.0])
def test_sparsity_takes_the_top_scores_jointly(sparsity):
    # Positive scores: the rule selects no other (and refuses sparsity 0, which selects nothing).
    g = torch.Generator().manual_seed(1)
    shapes = {"a.weight": (8, 12), "b.weight": (16, 12), "c.weight": (5,)}
    scores = {
        name: torch.randn(shape, generator=g).abs() * (i + 1)
        for i, (name, shape) in enumerate(shapes.items())
    }
    concept = ConceptNeurons.from_mask(select_neurons(scores, sparsity=sparsity))
    total = sum(math.prod(s) for s in shapes.values())
    assert concept.num_neurons == round(sparsity * total)
    chosen = [float(scores[n].reshape(-1)[i]) for n, idx in concept.indices.items() for i in idx.tolist()]
    others = [
        float(v)
        for n, s in scores.items()
        for i, v in enumerate(s.reshape(-1).tolist())
        if i not in set(concept.indices[n].tolist())
    ]
    if chosen and others:
        assert min(chosen) >= max(others)


def test_selection_rejects_bad_arguments():
    scores = {"a.weight": torch.randn(4, 4)}
    with pytest.raises(ValueError, match="exactly one"):
        select_neurons(scores)
    with pytest.raises(ValueError, match="exactly one"):
        select_neurons(scores, threshold=0.0, sparsity=0.1)
    with pytest.raises(ValueError, match="`sparsity` must be a fraction in \\(0, 1\\], got 1.5"):
        select_neurons(scores, sparsity=1.5)
    with pytest.raises(ValueError, match="NaN"):
        select_neurons({"a.weight": torch.tensor([0.0, float("nan")])}, sparsity=0.5)


def test_search_result_can_select_again():
    model, obj = least_squares()
    result = search(obj, model, method="alg1", steps=3, lr=0.05, sparsity=0.5)
    again = result.select(threshold=0.1)
    assert again.indices["weight"].tolist() == (result.scores["weight"] > 0.1).nonzero().flatten().tolist()
    assert again.metadata["search"]["threshold"] == 0.1 and again.metadata["search"]["sparsity"] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.1, "sparsity": 0.1}, "exactly one of `threshold` and `sparsity`"),
        ({"sparsity": None}, "exactly one of `threshold` and `sparsity`"),
        ({"sparsity": None, "threshold": -1.0}, "`threshold` must be"),
        ({"sparsity": 0.0}, "`sparsity` must be"),
        ({"sparsity": 1.5}, "`sparsity` must be"),
        ({"method": "alg3"}, "`method`"),
        ({"method": "alg1", "optimizer": "sgd"}, "`optimizer` applies to method='a2' only"),
        ({"optimizer": "lion"}, "`optimizer`"),
        ({"steps": 0}, "`steps`"),
        ({"lr": -1e-3}, "`lr`"),
        ({"checkpoint_every": 0}, "`checkpoint_every`"),
        ({"targets": ["to_q.weight"]}, "`targets`"),
    ],
)
def test_argument_errors(kwargs, match):
    model, obj = least_squares()
    with pytest.raises(ValueError, match=match):
        search(obj, model, **kwargs)


def test_restrict_to_outside_the_targets_is_an_error():
    model, obj = least_squares()
    elsewhere = ConceptNeurons.from_mask({"offset": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="`restrict_to` has neurons in"):
        search(obj, model, restrict_to=elsewhere)


def test_loss_that_ignores_the_targets_is_an_error():
    model, obj = least_squares()
    other, _ = least_squares()
    with pytest.raises(SearchError, match="does not depend on target `weight`"):
        search(obj, other)


# ---------------------------------------------------------------------------------------------------
# Non-finite losses and gradients.


class Overflowing:
    """Wraps an objective; its loss becomes inf at step `at`, as an fp16 overflow would."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at = inner, at

    def loss(self, step: int) -> torch.Tensor:
        loss = self.inner.loss(step)
        return loss * float("inf") if step == self.at else loss


def test_non_finite_loss_stops_the_search_and_restores_the_model():
    model, obj = least_squares()
    before = model.weight.detach().clone()
    with pytest.raises(SearchError, match=r"step 2: the loss is not finite.*float32.*smaller `lr`"):
        search(Overflowing(obj, at=2), model, method="alg1", steps=5, lr=0.5)
    assert torch.equal(model.weight.detach(), before)


def test_non_finite_gradient_stops_the_search():
    theta0 = torch.tensor([0.0, 1.0, -2.0])  # d√|θ|/dθ at θ = 0 is not finite
    model = Toy(theta0, torch.zeros(1))

    class Root:
        def loss(self, step: int) -> torch.Tensor:
            return model.weight.abs().sqrt().sum()

    with pytest.raises(SearchError, match="step 0: the gradient of `weight` is not finite"):
        search(Root(), model, steps=3)


# ---------------------------------------------------------------------------------------------------
# On the tiny real Stable Diffusion pipeline.


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def tiny_objective(pipe, seed: int = 0, dtype=None) -> ConceptObjective:
    return ConceptObjective.from_pipeline(
        pipe,
        images(3, seed=1),
        token="sks",
        class_word="dog",
        class_images=images(4, seed=2),
        config=ObjectiveConfig(seed=seed),
        dtype=dtype,
    )


def test_theorem_3_1_on_the_tiny_model(tiny_pipe):
    # float64, so that first-order effects are measured without rounding noise.
    unet = tiny_pipe.unet.double()
    obj = tiny_objective(tiny_pipe, dtype=torch.float64)
    # One step of Algorithm 1 gives M_p = θ ⊙ ∇L(θ) at step 0's noise and timesteps.
    result = find_concept_neurons(obj, unet, method="alg1", steps=1, lr=1e-3, threshold=0.0, disable=True)
    scores, params = result.scores, dict(unet.named_parameters())
    with torch.no_grad():
        base = obj.loss(0).item()

    def loss_after_scaling(selected: dict[str, torch.Tensor], eps: float) -> float:
        """L(θ with the selected weights times α = 1 − ε), same noise; the weights are put back after."""
        saved = {name: params[name].detach().clone() for name in selected}
        with torch.no_grad():
            for name, mask in selected.items():
                params[name][mask] *= 1 - eps
            value = obj.loss(0).item()
            for name, t in saved.items():
                params[name].copy_(t)
        return value

    positive = result.concept.masks()  # the concept neurons: θ·∂L/∂θ > 0
    negative = {name: s < 0 for name, s in scores.items()}
    predicted = sum(scores[name][m].sum().item() for name, m in positive.items())  # Σ θ·∂L/∂θ over them
    assert result.concept.num_neurons > 0 and predicted > 0
    for eps in (1e-3, 1e-4):
        drop = base - loss_after_scaling(positive, eps)
        assert drop > 0  # scaling concept neurons down lowers the loss ...
        assert drop / eps == pytest.approx(predicted, rel=2 * eps)  # ... by ε·Σ θ∂L/∂θ to first order
        assert loss_after_scaling(negative, eps) > base  # ... and scaling the others down raises it
    # Eqs. (5)-(6): one update α = 1 − ρ θ ∂L/∂θ of all weights lowers the loss by ≈ ρ Σ (θ ∂L/∂θ)².
    rho = 1e-2
    saved = {name: params[name].detach().clone() for name in scores}
    with torch.no_grad():
        for name, s in scores.items():
            params[name] *= 1 - rho * s.to(params[name])
        after = obj.loss(0).item()
        for name, t in saved.items():
            params[name].copy_(t)
    expected = rho * sum((s * s).sum().item() for s in scores.values())
    assert base - after == pytest.approx(expected, rel=1e-3)


def snapshot(unet: nn.Module) -> dict:
    return {
        name: (p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
        for name, p in unet.named_parameters()
    }


def assert_same(unet: nn.Module, before: dict) -> None:
    for name, p in unet.named_parameters():
        value, flag, grad = before[name]
        assert torch.equal(p.detach(), value) and p.requires_grad == flag, name
        assert (grad is None and p.grad is None) or torch.equal(grad, p.grad), name


def test_search_is_deterministic_and_leaves_the_unet_bit_identical(tiny_pipe):
    unet = tiny_pipe.unet
    unet.conv_in.weight.requires_grad_(False)
    unet.conv_out.weight.grad = torch.ones_like(unet.conv_out.weight)
    before = snapshot(unet)
    obj = tiny_objective(tiny_pipe)
    first = find_concept_neurons(obj, unet, steps=3, lr=1e-3, sparsity=0.05, disable=True)
    assert_same(unet, before)
    second = find_concept_neurons(
        tiny_objective(tiny_pipe), unet, steps=3, lr=1e-3, sparsity=0.05, disable=True
    )
    assert first.concept == second.concept and first.losses == second.losses
    assert all(torch.equal(first.scores[n], second.scores[n]) for n in first.scores)
    assert first.concept.num_neurons == round(0.05 * first.concept.total_weights)
    assert first.concept.token == "sks" and first.concept.class_word == "dog"
    cross = [n for n, _ in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert list(first.concept.shapes) == cross
    other = find_concept_neurons(
        tiny_objective(tiny_pipe, seed=1), unet, steps=3, lr=1e-3, sparsity=0.05, disable=True
    )
    assert other.losses != first.losses and other.concept != first.concept
    # A search that fails midway restores the UNet too.

    def stop(progress: SearchProgress) -> None:
        if progress.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        find_concept_neurons(obj, unet, steps=3, lr=1e-3, sparsity=0.05, disable=True, callback=stop)
    assert_same(unet, before)


def test_sum_objective_searches_jointly(tiny_pipe):
    dog = tiny_objective(tiny_pipe)
    cat = ConceptObjective.from_pipeline(tiny_pipe, images(2, seed=3), token="xqz", class_word="cat")
    joint = SumObjective([dog, cat])
    result = find_concept_neurons(
        joint, tiny_pipe.unet, method="alg1", steps=1, lr=1e-3, threshold=0.0, disable=True
    )
    single = [
        find_concept_neurons(o, tiny_pipe.unet, method="alg1", steps=1, lr=1e-3, threshold=0.0, disable=True)
        for o in (dog, cat)
    ]
    # With one step M_p = θ ⊙ ∇(L_dog + L_cat) = M_p(dog) + M_p(cat).
    for name, s in result.scores.items():
        torch.testing.assert_close(s, single[0].scores[name] + single[1].scores[name], rtol=1e-4, atol=1e-7)
    assert result.concept.token is None


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def callback(progress: SearchProgress) -> None:
        if progress.step == step:
            raise Interrupt

    return callback


@pytest.mark.parametrize("method", ["a2", "alg1"])
def test_resume_gives_the_same_concept(tiny_pipe, tmp_path, method):
    os.mkdir(tmp_path / "run")
    unet, path = tiny_pipe.unet, str(tmp_path / "run" / "search.safetensors")
    settings = {"method": method, "steps": 5, "lr": 1e-3, "sparsity": 0.05, "disable": True}
    full = find_concept_neurons(tiny_objective(tiny_pipe), unet, **settings)
    with pytest.raises(Interrupt):  # steps 0..3 run; the checkpoint after step 3 holds 4 steps
        find_concept_neurons(
            tiny_objective(tiny_pipe),
            unet,
            checkpoint_path=path,
            checkpoint_every=2,
            callback=interrupt_at(3),
            **settings,
        )
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["cones_search"])["step"] == 4
    seen = []
    resumed = find_concept_neurons(
        tiny_objective(tiny_pipe),
        unet,
        checkpoint_path=path,
        checkpoint_every=2,
        callback=seen.append,
        **settings,
    )
    assert [p.step for p in seen] == [4]
    assert resumed.concept == full.concept and resumed.losses == full.losses
    assert all(torch.equal(resumed.scores[n], full.scores[n]) for n in full.scores)
    assert os.listdir(tmp_path / "run") == ["search.safetensors"]  # no temporary file left behind


def test_checkpoint_of_another_search_or_model_is_refused(tiny_pipe, tmp_path):
    unet, path = tiny_pipe.unet, str(tmp_path / "search.safetensors")
    find_concept_neurons(
        tiny_objective(tiny_pipe), unet, steps=2, lr=1e-3, sparsity=0.05, disable=True, checkpoint_path=path
    )
    with pytest.raises(SearchError, match=r"another search \(lr: 0.001 vs 0.002\)"):
        find_concept_neurons(
            tiny_objective(tiny_pipe),
            unet,
            steps=2,
            lr=2e-3,
            sparsity=0.05,
            disable=True,
            checkpoint_path=path,
        )
    with pytest.raises(SearchError, match="holds 2 steps, more than `steps`=1"):
        find_concept_neurons(
            tiny_objective(tiny_pipe),
            unet,
            steps=1,
            lr=1e-3,
            sparsity=0.05,
            disable=True,
            checkpoint_path=path,
        )
    concept = ConceptNeurons.from_mask(
        {n: torch.rand(p.shape) < 0.1 for n, p in unet.named_parameters() if "attn2.to_k" in n}
    )
    with concept.shut(unet), pytest.raises(SearchError, match="`unet` weights differ"):
        find_concept_neurons(
            tiny_objective(tiny_pipe),
            unet,
            steps=2,
            lr=1e-3,
            sparsity=0.05,
            disable=True,
            checkpoint_path=path,
        )


def test_checkpoint_of_another_objective_is_refused_and_the_objective_is_recorded(tiny_pipe, tmp_path):
    unet, path = tiny_pipe.unet, str(tmp_path / "search.safetensors")
    kwargs = dict(steps=2, lr=1e-3, sparsity=0.05, disable=True, checkpoint_path=path)
    first = find_concept_neurons(tiny_objective(tiny_pipe, seed=0), unet, **kwargs)
    recorded = first.concept.metadata["search"]["objective"]
    assert recorded == tiny_objective(tiny_pipe, seed=0).describe()
    assert (recorded["subject_images"], recorded["class_images"], recorded["seed"]) == (3, 4, 0)
    # wrappers that change no value of the loss describe it as the objective they wrap
    from cones.distributed import DistributedObjective
    from cones.dtypes import LossScaled

    assert LossScaled(tiny_objective(tiny_pipe)).describe() == recorded
    assert DistributedObjective(tiny_objective(tiny_pipe)).describe() == recorded
    with pytest.raises(SearchError, match=r"another search \(objective: seed 0 vs 1\)"):
        find_concept_neurons(tiny_objective(tiny_pipe, seed=1), unet, **kwargs)
    other_pictures = ConceptObjective.from_pipeline(
        tiny_pipe, images(3, seed=7), token="sks", class_word="dog", class_images=images(4, seed=2)
    )
    with pytest.raises(
        SearchError, match=r"another search \(objective: data '[0-9a-f]{16}' vs '[0-9a-f]{16}'\)"
    ):
        find_concept_neurons(other_pictures, unet, **kwargs)


SCRIPT = """
import os, sys
import torch
torch.set_num_threads({threads})  # as in the test process: the same reduction order, the same floats
sys.path.insert(0, {tests!r})
from diffusers import StableDiffusionPipeline
from test_search import tiny_objective
from cones.search import find_concept_neurons

def die(progress):
    if progress.step == 4:
        os._exit(17)  # no cleanup, no restore: as if the machine went away

pipe = StableDiffusionPipeline.from_pretrained({model!r})
find_concept_neurons(tiny_objective(pipe), pipe.unet, steps=7, lr=1e-3, sparsity=0.05, disable=True,
                     checkpoint_path={path!r}, checkpoint_every=2, callback=die)
"""


@pytest.mark.slow
def test_resume_after_the_process_was_killed(tiny_pipe_path, tmp_path):
    # Both processes load the same saved model (building the tiny tokenizer anew is not reproducible
    # across processes).
    path = str(tmp_path / "search.safetensors")
    script = textwrap.dedent(
        SCRIPT.format(tests=TESTS, model=tiny_pipe_path, path=path, threads=torch.get_num_threads())
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 17, done.stderr[-2000:]
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()["cones_search"])["step"] == 4
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_path)
    settings = {"steps": 7, "lr": 1e-3, "sparsity": 0.05, "disable": True}
    resumed = find_concept_neurons(tiny_objective(pipe), pipe.unet, checkpoint_path=path, **settings)
    full = find_concept_neurons(tiny_objective(pipe), pipe.unet, **settings)
    assert resumed.concept == full.concept and resumed.losses == full.losses
    assert all(torch.equal(resumed.scores[n], full.scores[n]) for n in full.scores)
