"""Array tasks writing one index at the same time; then `lorif inspect` and `lorif plan` on it.

Three real `python -m lorif_dist extract` processes (array tasks 0-2) start at once into
one index. Their shards must equal the ones a single process writes task after task, and
the manifest must list all three. The finished index then serves as the measured run that
`lorif plan`'s byte predictions are compared with, and as `lorif inspect`'s subject.
"""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from lorif_dist.config import load_config, replace
from lorif_dist.curvature import curvature_path, run_curvature
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, run_extract
from lorif_dist.inspection import format_report, inspect_index
from lorif_dist.manifest import manifest_path
from lorif_dist.plan import PlanInputs, make_plan, measured_throughput
from lorif_dist.storage import file_sha256, shard_path
from lorif_dist.testing import make_records, write_json
from tests.reliability_helpers import (
    REPO,
    TINY_RECIPE,
    cli_env,
    finish,
    manifest,
    shard_arrays,
    start_cli,
    tiny_overrides,
)

NUM_TASKS = 3
NUM_EXAMPLES = 24


@pytest.fixture(scope="module")
def concurrent_index(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("concurrent")
    train = write_json(root / "train.json", make_records(NUM_EXAMPLES, seed=11))
    index = root / "index"
    procs = [
        start_cli(
            "extract",
            tiny_overrides(
                checkpoints["llama"],
                train,
                index,
                "--run.task_id",
                str(task),
                "--run.num_tasks",
                str(NUM_TASKS),
            ),
            root / f"task{task}.log",
            root,
        )
        for task in range(NUM_TASKS)
    ]
    codes = [finish(p) for p in procs]
    logs = [(root / f"task{t}.log").read_text()[-2000:] for t in range(NUM_TASKS)]
    assert codes == [0] * NUM_TASKS, logs
    cfg = load_config(
        TINY_RECIPE,
        tiny_overrides(checkpoints["llama"], train, index, "--run.num_tasks", str(NUM_TASKS)),
    )
    run_curvature(cfg, init_runtime("cpu", "single", 0, NUM_TASKS))
    return root, cfg


def test_concurrent_array_tasks_do_not_clobber_each_other(concurrent_index, tmp_path):
    root, cfg = concurrent_index
    index = root / "index"
    entries = manifest(index)["shards"]
    assert sorted(entries) == [f"task-{t:04d}/rank-00000" for t in range(NUM_TASKS)]
    ids = []
    for task in range(NUM_TASKS):
        path = shard_path(index, task, 0)
        entry = entries[f"task-{task:04d}/rank-00000"]
        assert entry["sha256"] == file_sha256(path) and entry["bytes"] == path.stat().st_size
        with h5py.File(path, "r") as h5:
            ids.extend(h5["example_id"][...].tolist())
    assert sorted(ids) == list(range(NUM_EXAMPLES))  # each example once, none lost
    assert not list(index.rglob("*.tmp")) and not list(index.rglob("*.parts"))

    # The same tasks, one after another in one process: the same shards, byte for byte.
    runtime = init_runtime("cpu", "single", 0, NUM_TASKS)
    ref_cfg = replace(cfg, run={"index_dir": str(tmp_path / "sequential")})
    extractor = GradientExtractor(ref_cfg, runtime)
    try:
        for task in range(NUM_TASKS):
            runtime.task_id = task
            run_extract(ref_cfg, runtime, extractor)
    finally:
        extractor.close()
    for task in range(NUM_TASKS):
        assert shard_arrays(shard_path(index, task, 0)) == shard_arrays(
            shard_path(tmp_path / "sequential", task, 0)
        )


_HAMMER = """
import sys
from lorif_dist.manifest import record_shard
for i in range(50):
    record_shard(sys.argv[1], f"proc{sys.argv[2]}-{i}", {"n": i})
"""


def test_manifest_updates_from_many_processes_are_not_lost(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": {}}))
    procs = [
        subprocess.Popen([sys.executable, "-c", _HAMMER, str(tmp_path), str(p)], env=cli_env())
        for p in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert len(json.loads((tmp_path / "manifest.json").read_text())["shards"]) == 200


def test_plan_predicts_the_bytes_written_within_5_percent(concurrent_index):
    root, cfg = concurrent_index
    index = root / "index"
    inputs = PlanInputs(
        cfg=cfg,
        model_config=cfg.model.name_or_path,
        num_examples=NUM_EXAMPLES,
        mean_tokens=60,
        world_size=1,
        num_tasks=NUM_TASKS,
        tokens_per_second=measured_throughput(index),
        throughput_source="measured",
    )
    plan = make_plan(inputs)
    storage = plan["storage"]
    for name, predicted in storage["shard_bytes"].items():
        measured = (index / "shards" / f"{name}.h5").stat().st_size
        assert abs(predicted - measured) <= 0.05 * measured, (name, predicted, measured)
    layers = manifest(index)["identity"]["layers"]
    measured = {
        "index_bytes": sum(shard_path(index, t, 0).stat().st_size for t in range(NUM_TASKS)),
        "curvature_bytes": sum(curvature_path(index, s["name"]).stat().st_size for s in layers),
        "coords_bytes": sum(p.stat().st_size for p in (index / "curvature/coords").rglob("*.h5")),
    }
    for key, value in measured.items():
        assert abs(storage[key] - value) <= 0.05 * value, (key, storage[key], value)
        print(f"\nplan vs measured {key}: {storage[key]} vs {value}")
    # The layer table is the index's own.
    got = [(r["name"], r["d1"], r["d2"], r["c"]) for r in plan["layers"]]
    assert got == [(s["name"], s["d1"], s["d2"], s["c"]) for s in layers]
    assert plan["time"]["extract_rank_hours"] > 0


def test_inspect_reports_stages_shards_spectrum_and_next_step(concurrent_index, tmp_path):
    root, _ = concurrent_index
    report = inspect_index(root / "index", verify=True)
    assert report["stages"] == {"extract": "done", "curvature": "done", "query": False}
    assert report["examples"]["stored"] == NUM_EXAMPLES
    layers = manifest(root / "index")["identity"]["layers"]
    explained = []
    for spec in layers:
        with h5py.File(curvature_path(root / "index", spec["name"]), "r") as h5:
            explained.append(float(h5.attrs["explained_variance"]))
    assert report["curvature"]["explained_variance"]["min"] == min(explained)
    assert report["curvature"]["explained_variance"]["median"] == pytest.approx(
        float(np.median(explained))
    )
    assert "lorif query --config" in report["next"][0]
    text = format_report(report)
    assert "task-0002: 1/1 ranks finished" in text and "explained variance at r" in text

    # The same index with task 2 not yet run: listed as missing, and its command is next.
    shutil.copytree(root / "index", tmp_path / "index")
    m = manifest(tmp_path / "index")
    del m["shards"]["task-0002/rank-00000"]
    manifest_path(tmp_path / "index").write_text(json.dumps(m))
    shard_path(tmp_path / "index", 2, 0).unlink()
    report = inspect_index(tmp_path / "index")
    assert report["stages"]["extract"] == "incomplete"
    assert [s["state"] for s in report["shards"]] == ["finished", "finished", "missing"]
    assert len(report["next"]) == 1
    assert "--run.task_id 2 --run.num_tasks 3" in report["next"][0]
    # The command line prints the same.
    proc = subprocess.run(
        [sys.executable, "-m", "lorif_dist", "inspect", str(tmp_path / "index")],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "task-0002: 0/1 ranks finished, 0 examples, 0 B; rank-00000 missing" in proc.stdout
