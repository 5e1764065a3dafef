"""Every shipped recipe loads and validates; overrides are typed; YAML round-trips."""

from pathlib import Path

import pytest

from lorif_dist.config import Config, ConfigError, load_config, parse_overrides, save_config

RECIPES = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"tiny", "demo", "gpt2-small", "olmo3-7b-sft", "apertus-70b-sft"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(recipe, tmp_path):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)
    assert cfg.data.train_files and cfg.model.name_or_path
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_overrides_are_typed_and_lists_split_on_commas():
    cfg = load_config(
        None,
        [
            "--extract.projection_factor",
            "16",
            "--curvature.damping=0.01",
            "--data.train_files",
            "a.json,b.jsonl",
            "--query.save_scores",
            "true",
            "--data.limit",
            "none",
            "--data.template_vars",
            '{"name": "X"}',
        ],
    )
    assert cfg.extract.projection_factor == 16 and cfg.curvature.damping == 0.01
    assert cfg.data.train_files == ["a.json", "b.jsonl"] and cfg.query.save_scores is True
    assert cfg.data.limit is None and cfg.data.template_vars == {"name": "X"}


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="overrides look like --section.field VALUE"):
        parse_overrides(["extract.f", "2"])
    with pytest.raises(ConfigError, match="missing a value"):
        parse_overrides(["--extract.seed"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(None, ["--extracts.seed", "1"])
