"""Shard storage: the float16 round trip, empty shards, and resuming from parts."""

import h5py
import numpy as np
import pytest
import torch

from lorif_dist.factorize import densify, factorize
from lorif_dist.storage import FactorBlock, ShardReader, ShardWriter, to_storage


def _block(ids, grads, storage_dtype, rank=1):
    left, scale, right = factorize(grads, rank, "svd")
    l_np, s_np, r_np = to_storage(left, scale, right, storage_dtype)
    n = len(ids)
    return FactorBlock(
        example_ids=np.asarray(ids, np.int64),
        losses=np.ones(n, np.float32),
        num_tokens=np.full(n, 5, np.int32),
        left={"layer": l_np},
        right={"layer": r_np},
        scale={"layer": s_np},
    )


@pytest.mark.parametrize("magnitude", [1e-20, 1.0, 1e20])
def test_float16_round_trip_neither_overflows_nor_underflows(tmp_path, magnitude):
    gen = torch.Generator().manual_seed(0)
    grads = magnitude * torch.randn(6, 40, 30, generator=gen, dtype=torch.float64)
    exact = densify(*factorize(grads, 2, "svd"))
    writer = ShardWriter(tmp_path / "s.h5", "h", {"layer": (40, 30, 2)}, "float16")
    writer.write_part(_block(range(6), grads, "float16", rank=2), 0, 1)
    writer.finalize()
    with ShardReader(tmp_path / "s.h5") as reader:
        left, scale, right = reader.read("layer", 0, 6, torch.float64)
        assert reader.h5["layers/layer/left"].dtype == np.float16
        assert reader.h5["layers/layer/scale"].dtype == np.float32
    back = densify(left, scale, right)
    assert torch.isfinite(back).all()
    rel = (back - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel.max()) < 2e-3  # float16 keeps ~3 significant digits per entry


def test_a_rank_with_no_examples_writes_a_valid_empty_shard(tmp_path):
    writer = ShardWriter(tmp_path / "e.h5", "h", {"a": (4, 3, 1)}, "float16")
    num, sha = writer.finalize()
    assert num == 0 and len(sha) == 64
    with ShardReader(tmp_path / "e.h5") as reader:
        assert reader.num_examples == 0
        assert reader.h5["layers/a/left"].shape == (0, 4, 1)


def test_resume_continues_after_the_last_whole_part_and_matches(tmp_path):
    gen = torch.Generator().manual_seed(1)
    blocks = [
        _block([2 * i, 2 * i + 1], torch.randn(2, 5, 4, generator=gen), "float32") for i in range(3)
    ]
    dims = {"layer": (5, 4, 1)}

    straight = ShardWriter(tmp_path / "a.h5", "h", dims, "float32")
    for i, b in enumerate(blocks):
        straight.write_part(b, i, i + 1)
    straight.finalize()

    # Interrupted after two parts, with a half-written third part lying around.
    resumed = ShardWriter(tmp_path / "b.h5", "h", dims, "float32")
    resumed.write_part(blocks[0], 0, 1)
    resumed.write_part(blocks[1], 1, 2)
    (resumed.parts_dir / "part-000002.tmp").write_bytes(b"partial")
    assert not resumed.complete
    again = ShardWriter(tmp_path / "b.h5", "h", dims, "float32")
    assert again.resume_point() == 2
    again.write_part(blocks[2], 2, 3)
    again.finalize()
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        for key in ("example_id", "layers/layer/left", "layers/layer/right", "layers/layer/scale"):
            assert a[key][...].tobytes() == b[key][...].tobytes()


def test_resume_refuses_parts_of_another_config(tmp_path):
    w = ShardWriter(tmp_path / "c.h5", "old", {"layer": (5, 4, 1)}, "float32")
    w.write_part(_block([0], torch.randn(1, 5, 4), "float32"), 0, 1)
    with pytest.raises(ValueError, match="config hash old, this run has new"):
        ShardWriter(tmp_path / "c.h5", "new", {"layer": (5, 4, 1)}, "float32").resume_point()


def test_incomplete_or_corrupt_shard_is_refused(tmp_path):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ShardReader(tmp_path / "bad.h5")
