"""`lorif plan`: layer selection and shapes of 7B-70B architectures on the meta device, the
shard size model against real shards, and the command line.

(Predicted vs measured bytes of a real tiny run: test_concurrency.py.)
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lorif_dist.cli import main
from lorif_dist.config import Config, load_config
from lorif_dist.modeling import select_layers
from lorif_dist.plan import (
    LayerPlan,
    ShardSizeModel,
    load_model_config,
    meta_model,
    plan_layers,
    shard_sizes,
)
from lorif_dist.storage import FactorBlock, ShardWriter

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
DEFAULT_LAYERS = Config().extract.layers

# name: (blocks, hidden, intermediate, kv width, MLP projections, parameters)
ARCHITECTURES = {
    "llama-3-8b": (32, 4096, 14336, 1024, ("gate_proj", "up_proj", "down_proj"), 8_030_261_248),
    "llama-3-70b": (80, 8192, 28672, 1024, ("gate_proj", "up_proj", "down_proj"), 70_553_706_496),
    "olmo-3-7b": (32, 4096, 11008, 4096, ("gate_proj", "up_proj", "down_proj"), None),
    # Apertus' MLP is not gated (xIELU activation): up and down projections only.
    "apertus-70b": (80, 8192, 43008, 1024, ("up_proj", "down_proj"), None),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_layer_selection_and_shapes_on_the_meta_device(name):
    blocks, hidden, inter, kv, mlp, params = ARCHITECTURES[name]
    model = meta_model(load_model_config(MODELS / name))
    assert all(p.device.type == "meta" for p in model.parameters())  # no memory, no weights
    specs = select_layers(model, DEFAULT_LAYERS)
    shapes = {s.name: (s.in_features, s.out_features) for s in specs}
    assert len(specs) == blocks * (4 + len(mlp))
    last = f"model.layers.{blocks - 1}"
    assert shapes[f"{last}.self_attn.q_proj"] == (hidden, hidden)
    assert shapes[f"{last}.self_attn.k_proj"] == (hidden, kv)
    assert shapes[f"{last}.self_attn.v_proj"] == (hidden, kv)
    assert shapes[f"{last}.self_attn.o_proj"] == (hidden, hidden)
    assert shapes[f"{last}.mlp.up_proj"] == (hidden, inter)
    assert shapes[f"{last}.mlp.down_proj"] == (inter, hidden)
    assert (f"{last}.mlp.gate_proj" in shapes) == ("gate_proj" in mlp)
    assert "lm_head" not in shapes
    num_params = sum(p.numel() for p in model.parameters())
    if params is not None:
        assert num_params == params
    # Projected shapes at f = 16, c = 1: d = width // 16, D = d1 d2.
    layers = {s.name: s for s in plan_layers(specs, 16, 1, False)}
    q = layers[f"{last}.self_attn.q_proj"]
    assert (q.d1, q.d2, q.dim) == (hidden // 16, hidden // 16, (hidden // 16) ** 2)
    down = layers[f"{last}.mlp.down_proj"]
    assert (down.d1, down.d2) == (inter // 16, hidden // 16)


def test_recipes_plan_with_their_model_configs(capsys):
    """The shipped 7B and 70B recipes, planned from the shipped configs (stated numbers)."""
    cfg = load_config(MODELS.parents[0] / "olmo3-7b-sft.yaml")
    args = ["plan", "--config", str(MODELS.parents[0] / "olmo3-7b-sft.yaml")]
    args += ["--model", str(MODELS / "olmo-3-7b"), "--num-examples", "100000", "--json"]
    args += ["--world-size", "8", "--num-tasks", "4", "--tokens-per-second", "3000"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    # 32 blocks: 4 attention projections 4096 -> 4096 and 3 MLP ones 4096 <-> 11008, f = 16.
    attention = 4 * ((256 + 256) * 2 + 4)
    mlp = 3 * ((256 + 688) * 2 + 4)
    assert plan["storage"]["bytes_per_example"] == 32 * (attention + mlp) + 16
    assert plan["storage"]["shard_examples_max"] == math.ceil(math.ceil(100000 / 4) / 8)
    assert plan["model"]["weights_bytes_per_rank"] == plan["model"]["weights_bytes"] / 8
    assert cfg.curvature.rank == plan["settings"]["r"]
    hours = 100000 * 512 / 3000 / 3600
    assert plan["time"]["extract_rank_hours"] == pytest.approx(hours)
    assert plan["time"]["extract_wall_hours"] == pytest.approx(hours / 32)


def test_shard_sizes_are_dealt_like_extraction():
    from lorif_dist.extract import assign_examples

    class Ex:
        def __init__(self, i):
            self.example_id, self.num_tokens = i, 100 - i % 7

    examples = [Ex(i) for i in range(103)]
    expected = [len(assign_examples(examples, t, 3, r, 4)) for t in range(3) for r in range(4)]
    assert shard_sizes(103, 3, 4) == expected


@pytest.mark.parametrize("num_examples", [0, 1, 65, 5000])
def test_shard_size_model_matches_real_shards(tmp_path, num_examples):
    """Partial last chunks, several chunks, and a chunk index that has split (> 64 chunks)."""
    rng = np.random.default_rng(num_examples)
    layers = [LayerPlan(f"model.layers.{i}.mlp.up_proj", 40, 24, 10, 6, 2) for i in range(5)]
    n = num_examples
    block = FactorBlock(
        example_ids=np.arange(n, dtype=np.int64),
        losses=rng.random(n).astype(np.float32),
        num_tokens=np.full(n, 9, np.int32),
        left={s.name: rng.random((n, s.d1, s.c)).astype(np.float16) for s in layers},
        right={s.name: rng.random((n, s.d2, s.c)).astype(np.float16) for s in layers},
        scale={s.name: rng.random((n, s.c)).astype(np.float32) for s in layers},
    )
    dims = {s.name: (s.d1, s.d2, s.c) for s in layers}
    writer = ShardWriter(tmp_path / "s.h5", "f" * 16, dims, "float16")
    if n:
        writer.write_part(block, 0, 1)
    writer.finalize()
    measured = (tmp_path / "s.h5").stat().st_size
    predicted = ShardSizeModel(layers, "float16").bytes(n)
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)


def test_plan_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="model config .*nowhere.* not found"):
        load_model_config(tmp_path / "nowhere")
    args = ["plan", "--model", str(MODELS / "llama-3-8b"), "--num-examples", "0"]
    assert main(args) == 2


def test_plan_refuses_dense_methods_with_their_sizes(capsys):
    """logra/graddot are not modelled: refused, with the rows and inverses that dominate."""
    args = ["plan", "--model", str(MODELS / "llama-3-8b"), "--num-examples", "10"]
    assert main(args + ["--extract.method", "logra"]) == 2
    err = capsys.readouterr().err
    assert "extract.method lorif only, got 'logra'" in err and "damped inverses" in err
    assert main(args + ["--extract.method", "graddot"]) == 2
    assert "got 'graddot'" in capsys.readouterr().err


def test_plan_mean_tokens_default_respects_the_recipe_max_length(capsys):
    args = ["plan", "--model", str(MODELS / "llama-3-8b"), "--num-examples", "10", "--json"]
    assert main(args + ["--data.max_length", "96"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["mean_tokens"] == 96
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["data"]["mean_tokens"] == 512
