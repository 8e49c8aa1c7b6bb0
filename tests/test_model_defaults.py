"""A model carries its own search defaults (`cones.json` in its folder); flags override them."""

from __future__ import annotations

import argparse
import json

import pytest

import cones_world
from cones.cli._options import add_config_arguments, config_from_args
from cones.config import FindConfig, model_find_defaults
from cones.errors import InputError


def test_the_embedded_model_carries_the_sparsity_it_needs():
    assert model_find_defaults(cones_world.model_path()) == {"sparsity": 0.05}
    config = FindConfig.for_model(cones_world.model_path())
    assert config.sparsity == 0.05 and config.steps == FindConfig().steps


def test_a_model_without_defaults_gets_findconfigs(tmp_path):
    assert model_find_defaults(tmp_path) == {}
    assert FindConfig.for_model(tmp_path) == FindConfig() == FindConfig.for_model(None)


def test_an_unknown_setting_is_one_line_naming_it(tmp_path):
    (tmp_path / "cones.json").write_text(json.dumps({"find": {"sparsty": 0.05}}))
    with pytest.raises(InputError, match="sparsty.*not search settings"):
        model_find_defaults(tmp_path)


def test_flags_override_the_models_defaults_and_the_rest_stay(tmp_path):
    (tmp_path / "cones.json").write_text(json.dumps({"find": {"sparsity": 0.05, "steps": 200}}))
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, FindConfig, model_defaults=True)
    base = FindConfig.for_model(tmp_path)
    given = config_from_args(FindConfig, parser.parse_args(["--steps", "50"]), base=base)
    assert (given.steps, given.sparsity, given.lr) == (50, 0.05, FindConfig().lr)
    assert config_from_args(FindConfig, parser.parse_args([]), base=base) == base
    assert "or the model's" in parser.format_help()


def test_the_method_names_the_command_line_offers_are_the_strategies():
    from cones.config import METHOD_NAMES
    from cones.search import METHODS

    assert set(METHOD_NAMES) == set(METHODS)


def test_the_python_api_takes_the_models_defaults_too():
    from cones.find import model_config
    from cones.pipeline import load_pipeline

    assert model_config(load_pipeline()).sparsity == 0.05
