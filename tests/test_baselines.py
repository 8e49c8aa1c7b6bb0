"""The baselines (DreamBooth, Custom Diffusion, Textual Inversion) against hand computations, on the tiny pipeline.

- One training step is one AdamW step, computed here by hand from an independently taken gradient:
  θ1 = θ0·(1 − lr·wd) − lr·ĝ/(|ĝ| + eps), with ĝ the gradient clipped to norm 1. This pins down which
  weights each method trains (all UNet weights; cross-attention K/V + the identifier's row; the row only)
  and where each row starts (its own value; the class word's value).
- The re-encoding objective equals the search's objective while the rows are untouched.
- apply / remove / training leave the pipeline bit for bit as it was.
- Custom Diffusion's closed-form merge against the solution of its KKT system.
"""

import os

import pytest
import torch
from safetensors.torch import save_file

from cones.baselines import (
    BaselineWeights,
    JointObjective,
    TokenEmbeddings,
    TokenObjective,
    applied,
    applied_weights,
    custom_diffusion,
    dreambooth,
    load,
    save,
    textual_inversion,
)
from cones.objective import ConceptObjective, ObjectiveConfig
from cones.targets import target_parameters

LR, WD, EPS = 1e-3, 1e-2, 1e-8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def objective(pipe, token="sks", class_word="dog", seed=0) -> ConceptObjective:
    return ConceptObjective.from_pipeline(
        pipe,
        images(3, seed=1 + seed),
        token=token,
        class_word=class_word,
        class_images=images(4, seed=10 + seed),
        config=ObjectiveConfig(
            subject_templates=("a {token} {class_word}", "a photo of a {token} {class_word}"),
            batch_size=2,
            seed=seed,
        ),
    )


def snapshot(pipe) -> dict[str, torch.Tensor]:
    state = {f"unet.{n}": p.detach().clone() for n, p in pipe.unet.named_parameters()}
    state |= {f"text.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    return state


def assert_same(pipe, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


def row(pipe, word: str) -> torch.Tensor:
    (i,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
    return pipe.text_encoder.get_input_embeddings().weight[i].detach().clone()


def adamw_first_step(theta0: dict, grads: dict, lr: float, wd: float, max_norm: float = 1.0) -> dict:
    """θ after one AdamW step from zero moments, with the gradient clipped to global norm `max_norm`."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    out = {}
    for name, t in theta0.items():
        g = grads[name].double() * scale
        out[name] = t.double() * (1 - lr * wd) - lr * g / (g.abs() + EPS)
    return out


# -- the objective with trainable rows ------------------------------------------------------------------


def test_token_objective_is_the_objective_while_rows_are_untouched(tiny_pipe):
    base = objective(tiny_pipe)
    wrapped = TokenObjective(
        base, TokenEmbeddings(tiny_pipe.text_encoder, tiny_pipe.tokenizer, {"sks": row(tiny_pipe, "sks")})
    )
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(wrapped.loss(step), base.loss(step), rtol=1e-6, atol=1e-7)


def test_gradient_reaches_the_rows_of_words_in_the_prompts_only(tiny_pipe):
    emb = TokenEmbeddings(
        tiny_pipe.text_encoder,
        tiny_pipe.tokenizer,
        {"sks": row(tiny_pipe, "sks"), "xqz": row(tiny_pipe, "xqz")},
    )
    loss = TokenObjective(objective(tiny_pipe), emb).loss(0)
    g_sks, g_xqz = torch.autograd.grad(loss, emb.rows)
    assert g_sks.abs().sum() > 0
    assert torch.equal(g_xqz, torch.zeros_like(g_xqz))


def test_rows_change_the_encoding_of_their_word_only(tiny_pipe):
    emb = TokenEmbeddings(tiny_pipe.text_encoder, tiny_pipe.tokenizer, {"sks": row(tiny_pipe, "sks") + 1.0})
    with torch.no_grad():
        moved = emb.encode(["a sks dog", "a dog"])
        ids = emb.token_ids(["a sks dog", "a dog"])
        plain = tiny_pipe.text_encoder(ids)[0]
    assert not torch.allclose(moved[0], plain[0])
    assert torch.equal(moved[1], plain[1])


def test_joint_objective_takes_turns(tiny_pipe):
    a, b = objective(tiny_pipe, "sks", "dog", seed=0), objective(tiny_pipe, "xqz", "cat", seed=1)
    joint = JointObjective([a, b])
    with torch.no_grad():
        assert torch.equal(joint.loss(0), a.loss(0))
        assert torch.equal(joint.loss(1), b.loss(0))
        assert torch.equal(joint.loss(4), a.loss(2))
        assert torch.equal(joint.loss(5), b.loss(2))


# -- one training step, by hand --------------------------------------------------------------------------


def test_dreambooth_step_is_adamw_on_every_unet_weight(tiny_pipe):
    obj = objective(tiny_pipe)
    params = dict(tiny_pipe.unet.named_parameters())
    grads = dict(
        zip(params, torch.autograd.grad(obj.loss(0), list(params.values()), allow_unused=True), strict=True)
    )
    grads = {n: g if g is not None else torch.zeros_like(params[n]) for n, g in grads.items()}
    expected = adamw_first_step({n: p.detach() for n, p in params.items()}, grads, LR, WD)
    before = snapshot(tiny_pipe)

    weights = dreambooth.train(tiny_pipe, obj, steps=1, lr=LR, weight_decay=WD, disable=True)

    assert weights.method == "dreambooth" and weights.tokens == {}
    for name, p in params.items():
        changed = not torch.equal(expected[name].float(), p.detach())
        assert (name in weights.unet) == changed, name
        if changed:
            torch.testing.assert_close(
                weights.unet[name].double(), expected[name], rtol=0, atol=1e-6 * LR + 1e-7
            )
    assert len(weights.unet) > 0.9 * len(params)
    assert_same(tiny_pipe, before)


def test_custom_diffusion_step_trains_cross_kv_and_the_identifier_row_from_itself(tiny_pipe):
    obj = objective(tiny_pipe)
    kv = target_parameters(tiny_pipe.unet, "cross")
    emb = TokenEmbeddings(tiny_pipe.text_encoder, tiny_pipe.tokenizer, {"sks": row(tiny_pipe, "sks")})
    loss = TokenObjective(obj, emb).loss(0)
    g = torch.autograd.grad(loss, [*kv.values(), emb.rows[0]])
    grads = dict(zip([*kv, "sks"], g, strict=True))
    theta0 = {n: p.detach() for n, p in kv.items()} | {"sks": row(tiny_pipe, "sks")}
    expected = adamw_first_step(theta0, grads, LR, WD)
    before = snapshot(tiny_pipe)

    weights = custom_diffusion.train(tiny_pipe, obj, steps=1, lr=LR, weight_decay=WD, disable=True)

    assert set(weights.unet) == set(kv)  # exactly the attn2 to_k / to_v weights
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in weights.unet)
    for name in kv:
        torch.testing.assert_close(weights.unet[name].double(), expected[name], rtol=0, atol=1e-6 * LR + 1e-7)
    assert list(weights.tokens) == ["sks"]
    torch.testing.assert_close(weights.tokens["sks"].double(), expected["sks"], rtol=0, atol=1e-6 * LR + 1e-7)
    assert_same(tiny_pipe, before)


def test_textual_inversion_step_trains_one_row_started_from_the_class_word(tiny_pipe):
    obj = objective(tiny_pipe)
    emb = TokenEmbeddings(tiny_pipe.text_encoder, tiny_pipe.tokenizer, {"sks": row(tiny_pipe, "dog")})
    (g,) = torch.autograd.grad(TokenObjective(obj, emb).loss(0), emb.rows)
    expected = adamw_first_step({"sks": row(tiny_pipe, "dog")}, {"sks": g}, LR, WD)["sks"]
    before = snapshot(tiny_pipe)

    weights = textual_inversion.train(tiny_pipe, obj, steps=1, lr=LR, weight_decay=WD, disable=True)

    assert weights.unet == {} and list(weights.tokens) == ["sks"]
    torch.testing.assert_close(weights.tokens["sks"].double(), expected, rtol=0, atol=1e-6 * LR + 1e-7)
    assert weights.num_parameters == tiny_pipe.text_encoder.config.hidden_size
    assert_same(tiny_pipe, before)


class FixedBatch(ConceptObjective):
    """The objective of one step, at every step: training on it must bring that one loss down."""

    def __init__(self, objective: ConceptObjective) -> None:
        vars(self).update(vars(objective))

    def loss(self, step: int) -> torch.Tensor:
        return super().loss(0)


@pytest.mark.parametrize("method", [dreambooth, custom_diffusion, textual_inversion])
def test_training_lowers_the_loss_it_trains_on(tiny_pipe, method):
    obj = FixedBatch(objective(tiny_pipe))
    # where training starts: the model as it is, but Textual Inversion's row starts as the class word's
    init = BaselineWeights("textual_inversion", tokens={"sks": row(tiny_pipe, "dog")})
    with (
        torch.no_grad(),
        applied(tiny_pipe, init if method is textual_inversion else BaselineWeights(method.METHOD)),
    ):
        start = FixedBatch(objective(tiny_pipe)).loss(0).item()  # prompts encoded with the starting row
    weights = method.train(
        tiny_pipe, obj, steps=15, lr=3e-3 if method is not textual_inversion else 3e-2, disable=True
    )
    assert weights.losses[0] == pytest.approx(start, rel=1e-5)
    with applied(tiny_pipe, weights), torch.no_grad():
        end = FixedBatch(objective(tiny_pipe)).loss(0).item()
    assert end < start


def test_multi_subject_training_takes_turns_and_keeps_tokens_apart(tiny_pipe):
    """Textual Inversion of two subjects: step 0 is subject a's, step 1 subject b's, whose row step 0 left alone."""
    a, b = objective(tiny_pipe, "sks", "dog", seed=0), objective(tiny_pipe, "xqz", "cat", seed=1)
    init = BaselineWeights(
        "textual_inversion", tokens={"sks": row(tiny_pipe, "dog"), "xqz": row(tiny_pipe, "cat")}
    )
    with torch.no_grad(), applied(tiny_pipe, init):
        first = [
            objective(tiny_pipe, "sks", "dog", seed=0).loss(0).item(),
            objective(tiny_pipe, "xqz", "cat", seed=1).loss(0).item(),
        ]
    weights = textual_inversion.train(tiny_pipe, [a, b], steps=2, lr=LR, disable=True)
    assert set(weights.tokens) == {"sks", "xqz"}
    assert weights.losses[0] == pytest.approx(first[0], rel=1e-6)
    assert weights.losses[1] == pytest.approx(first[1], rel=1e-6)
    with pytest.raises(ValueError, match="share identifiers"):
        textual_inversion.train(tiny_pipe, [a, objective(tiny_pipe, "sks", "cat")], steps=1, disable=True)


def test_training_refuses_bad_input(tiny_pipe, tmp_path):
    from tiny import make_tiny_pipeline

    other = make_tiny_pipeline(str(tmp_path), seed=3)
    with pytest.raises(ValueError, match="another UNet"):
        dreambooth.train(tiny_pipe, objective(other), steps=1, disable=True)
    with pytest.raises(ValueError, match="`steps`"):
        dreambooth.train(tiny_pipe, objective(tiny_pipe), steps=0, disable=True)
    with pytest.raises(ValueError, match="`class_word` 'dog cat' is 2 tokens"):
        textual_inversion.train(tiny_pipe, objective(tiny_pipe, class_word="dog cat"), steps=1, disable=True)


# -- apply, remove, files ----------------------------------------------------------------------------------


@pytest.fixture
def all_weights(tiny_pipe):
    obj = objective(tiny_pipe)
    return [
        dreambooth.train(tiny_pipe, obj, steps=2, lr=1e-2, disable=True),
        custom_diffusion.train(tiny_pipe, obj, steps=2, lr=1e-2, disable=True),
        textual_inversion.train(tiny_pipe, obj, steps=2, lr=1e-1, disable=True),
    ]


def test_apply_writes_the_weights_and_remove_restores_bit_for_bit(tiny_pipe, all_weights):
    before = snapshot(tiny_pipe)
    params = dict(tiny_pipe.unet.named_parameters())
    for weights in all_weights:
        weights.apply(tiny_pipe)
        assert applied_weights(tiny_pipe) is weights
        for name, t in weights.unet.items():
            assert torch.equal(params[name].detach(), t)
        for word, t in weights.tokens.items():
            assert torch.equal(row(tiny_pipe, word), t)
        weights.remove(tiny_pipe)
        assert applied_weights(tiny_pipe) is None
        assert_same(tiny_pipe, before)
    with applied(tiny_pipe, all_weights[1]):
        with pytest.raises(ValueError, match="already has custom_diffusion"):
            all_weights[0].apply(tiny_pipe)
        with pytest.raises(ValueError, match="not the ones applied"):
            all_weights[0].remove(tiny_pipe)
    assert_same(tiny_pipe, before)
    with pytest.raises(ValueError, match="nothing to remove"):
        all_weights[0].remove(tiny_pipe)


def test_applied_weights_change_what_the_text_encoder_and_unet_compute(tiny_pipe, all_weights):
    ids = tiny_pipe.tokenizer(
        ["a sks dog"], padding="max_length", max_length=16, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        plain = tiny_pipe.text_encoder(ids)[0]
        with applied(tiny_pipe, all_weights[2]):
            inverted = tiny_pipe.text_encoder(ids)[0]
    assert not torch.allclose(plain, inverted)


def test_apply_refuses_weights_of_another_model(tiny_pipe):
    bad = BaselineWeights("custom_diffusion", unet={"down_blocks.9.attn2.to_k.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="lacks"):
        bad.apply(tiny_pipe)
    bad = BaselineWeights("textual_inversion", tokens={"sks": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        bad.apply(tiny_pipe)
    assert applied_weights(tiny_pipe) is None


def test_save_and_load(tmp_path, all_weights):
    for weights in all_weights:
        path = tmp_path / f"{weights.method}.safetensors"
        size = save(weights, path)
        assert size == os.path.getsize(path)
        back = load(path)
        assert back.method == weights.method and back.metadata == weights.metadata
        assert back.unet.keys() == weights.unet.keys() and back.tokens.keys() == weights.tokens.keys()
        for name in weights.unet:
            assert torch.equal(back.unet[name], weights.unet[name])
        for word in weights.tokens:
            assert torch.equal(back.tokens[word], weights.tokens[word])
        half = save(weights, tmp_path / f"{weights.method}-fp16.safetensors", dtype=torch.float16)
        payload = 4 * weights.num_parameters
        assert size - payload == pytest.approx(half - payload // 2, abs=64)  # same header, half the numbers
        with pytest.raises(FileExistsError, match="overwrite"):
            save(weights, path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a cones baseline file"):
        load(tmp_path / "other.safetensors")


# -- Custom Diffusion's constrained merge -------------------------------------------------------------------


def kkt_merge(w0, c_reg, c, v):
    """Row by row, the KKT system of min δᵀMδ s.t. Cδ = r: [[2M, Cᵀ], [C, 0]] [δ; μ] = [0; r]."""
    m = (c_reg.T @ c_reg).double()
    n, d_in = c.shape
    kkt = torch.zeros(d_in + n, d_in + n, dtype=torch.float64)
    kkt[:d_in, :d_in], kkt[:d_in, d_in:], kkt[d_in:, :d_in] = 2 * m, c.T.double(), c.double()
    r = v.double() - c.double() @ w0.double().T  # (n, out)
    rhs = torch.cat([torch.zeros(d_in, r.shape[1], dtype=torch.float64), r])
    delta = torch.linalg.solve(kkt, rhs)[:d_in]  # (in, out)
    return w0.double() + delta.T


def test_constrained_merge_is_the_kkt_solution():
    g = torch.Generator().manual_seed(0)
    w0, c_reg = (
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.randn(40, 7, generator=g, dtype=torch.float64),
    )
    c, v = (
        torch.randn(3, 7, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    w = custom_diffusion.constrained_merge(w0, c_reg, c, v)
    torch.testing.assert_close(w @ c.T, v.T, rtol=0, atol=1e-9)  # the constraints hold
    torch.testing.assert_close(w, kkt_merge(w0, c_reg, c, v), rtol=0, atol=1e-9)
    # any other weight meeting the constraints costs more: move along a direction that keeps W Cᵀ fixed
    null = torch.linalg.svd(c).Vh[3:]  # (4, 7) rows orthogonal to every constraint input
    other = w + torch.randn(5, 4, generator=g, dtype=torch.float64) @ null
    torch.testing.assert_close(other @ c.T, v.T, rtol=0, atol=1e-9)
    cost = lambda x: ((x - w0) @ c_reg.T).square().sum()  # noqa: E731
    assert cost(other) > cost(w)


def test_constrained_merge_without_constraints_left_keeps_w0_and_splits_conflicts():
    g = torch.Generator().manual_seed(1)
    w0, c_reg = (
        torch.randn(4, 6, generator=g, dtype=torch.float64),
        torch.randn(30, 6, generator=g, dtype=torch.float64),
    )
    c = torch.randn(2, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        custom_diffusion.constrained_merge(w0, c_reg, c, c @ w0.T), w0, rtol=0, atol=1e-10
    )
    # the same input asked for two different outputs: least squares meets them halfway
    v1, v2 = (
        torch.randn(1, 4, generator=g, dtype=torch.float64),
        torch.randn(1, 4, generator=g, dtype=torch.float64),
    )
    w = custom_diffusion.constrained_merge(w0, c_reg, torch.cat([c[:1], c[:1]]), torch.cat([v1, v2]))
    torch.testing.assert_close(c[:1] @ w.T, (v1 + v2) / 2, rtol=0, atol=1e-9)


def test_merge_keeps_what_each_subject_made_of_its_own_words(tiny_pipe):
    a, b = objective(tiny_pipe, "sks", "dog", seed=0), objective(tiny_pipe, "xqz", "cat", seed=1)
    wa = custom_diffusion.train(tiny_pipe, a, steps=2, lr=1e-2, disable=True)
    wb = custom_diffusion.train(tiny_pipe, b, steps=2, lr=1e-2, disable=True)
    reg = [
        f"a {c} {s} on {p}"
        for c in ("red", "blue", "green")
        for s in ("mug", "dog", "cat")
        for p in ("beach", "snow")
    ]
    before = snapshot(tiny_pipe)
    merged = custom_diffusion.merge(tiny_pipe, [wa, wb], [["sks dog"], ["xqz cat"]], reg)
    assert_same(tiny_pipe, before)
    assert set(merged.tokens) == {"sks", "xqz"} and set(merged.unet) == set(wa.unet)
    emb = TokenEmbeddings(tiny_pipe.text_encoder, tiny_pipe.tokenizer, merged.tokens)
    with torch.no_grad():
        feats = emb.encode(["sks dog", "xqz cat"])[:, 1:4]  # (2, 3, dim): the two words and end-of-text
    for name in merged.unet:
        for i, own in enumerate((wa, wb)):
            torch.testing.assert_close(
                feats[i] @ merged.unet[name].T, feats[i] @ own.unet[name].T, rtol=1e-4, atol=1e-5
            )
    with pytest.raises(ValueError, match="only custom_diffusion"):
        custom_diffusion.merge(
            tiny_pipe,
            [wa, dreambooth.train(tiny_pipe, a, steps=1, disable=True)],
            [["sks dog"], ["sks dog"]],
            reg,
        )
