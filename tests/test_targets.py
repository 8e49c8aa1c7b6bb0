import pytest

from cones.targets import TARGET_PRESETS, parameter_shapes, resolve_patterns, target_parameters

# The tiny UNet has four transformer blocks: one down, one mid, two up.
NUM_BLOCKS = 4


def test_cross_preset_is_attn2_key_and_value_in_model_order(tiny_pipe):
    unet = tiny_pipe.unet
    params = target_parameters(unet)
    assert len(params) == 2 * NUM_BLOCKS
    assert all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in params)
    order = [name for name, _ in unet.named_parameters()]
    assert list(params) == sorted(params, key=order.index)
    assert all(params[name] is unet.get_parameter(name) for name in params)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in params


def test_all_is_self_plus_cross(tiny_pipe):
    unet = tiny_pipe.unet
    cross, self_, every = (target_parameters(unet, p) for p in ("cross", "self", "all"))
    assert all(".attn1." in name for name in self_)
    assert set(every) == set(cross) | set(self_)
    assert len(every) == 4 * NUM_BLOCKS
    order = [name for name, _ in unet.named_parameters()]
    assert list(every) == sorted(every, key=order.index)


def test_explicit_suffixes_and_globs(tiny_pipe):
    unet = tiny_pipe.unet
    assert set(target_parameters(unet, ["attn2.to_k.weight"])) == {
        n for n in target_parameters(unet) if n.endswith("to_k.weight")
    }
    # A suffix matches at a dot boundary only, on any attention layer.
    assert len(target_parameters(unet, ["to_v.weight"])) == 2 * NUM_BLOCKS
    with pytest.raises(ValueError, match="matches no parameter"):
        target_parameters(unet, ["o_v.weight"])
    up = target_parameters(unet, ["up_blocks.*.attn2.to_v.weight"])
    assert up and all(n.startswith("up_blocks.") and n.endswith("attn2.to_v.weight") for n in up)


def test_bad_targets_give_clear_errors(tiny_pipe):
    with pytest.raises(ValueError, match="not a preset"):
        target_parameters(tiny_pipe.unet, "crosss")
    with pytest.raises(ValueError, match="non-empty list"):
        target_parameters(tiny_pipe.unet, [])
    with pytest.raises(ValueError, match="matches no parameter"):
        target_parameters(tiny_pipe.unet, ["attn3.to_k.weight"])


def test_presets_resolve_and_shapes_follow_parameters(tiny_pipe):
    assert resolve_patterns("all") == TARGET_PRESETS["all"]
    shapes = parameter_shapes(tiny_pipe.unet, "all")
    params = target_parameters(tiny_pipe.unet, "all")
    assert shapes == {name: tuple(p.shape) for name, p in params.items()}
    # Cross-attention keys/values read the text (cross_attention_dim 32); self-attention ones the image.
    assert all(shape[1] == 32 for name, shape in shapes.items() if ".attn2." in name)
