"""Hook-captured per-example gradients against plain autograd, one example at a time."""

import pytest
import torch

from lorif_dist.config import load_config
from lorif_dist.distributed import init_runtime
from lorif_dist.extract import GradientExtractor, load_train_examples
from tests.reference import projected_gradients


def _extractor(ckpt, train, factor, extra=()):
    cfg = load_config(
        None,
        [
            "--model.name_or_path",
            str(ckpt),
            "--model.dtype",
            "float64",
            "--model.device",
            "cpu",
            "--data.train_files",
            str(train),
            "--data.max_length",
            "72",
            "--extract.projection_factor",
            str(factor),
            "--extract.accumulate_dtype",
            "float64",
            *extra,
        ],
    )
    return cfg, GradientExtractor(cfg, init_runtime("cpu", "single"))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_hooks_match_per_example_autograd(checkpoints, data_files, kind, factor, padding_side):
    cfg, ex = _extractor(
        checkpoints[kind], data_files["train"], factor, ["--extract.padding_side", padding_side]
    )
    examples, _ = load_train_examples(cfg, ex.tokenizer)
    batch = examples[:6]  # several lengths: padding inside the batch
    assert len({e.num_tokens for e in batch}) > 1
    _, grads, finite = ex.batch_gradients(batch)
    reference = projected_gradients(ex.model, ex.specs, ex.projections, batch)
    assert bool(finite.all())
    for name, ref in reference.items():
        got = grads[name].reshape(len(batch), -1)
        scale = ref.abs().max()
        assert scale > 0, f"{name}: zero reference gradient, the test would prove nothing"
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * scale, msg=name)
    ex.close()


def test_gpt2_conv1d_square_and_rectangular_layers_are_tracked(checkpoints, data_files):
    _, ex = _extractor(checkpoints["gpt2"], data_files["train"], 1)
    shapes = {s.name: (s.kind, s.in_features, s.out_features) for s in ex.specs}
    assert shapes["transformer.h.0.attn.c_attn"] == ("conv1d", 16, 48)
    assert shapes["transformer.h.0.attn.c_proj"] == ("conv1d", 16, 16)
    assert shapes["transformer.h.0.mlp.c_proj"] == ("conv1d", 64, 16)
    assert not any("lm_head" in n or "wte" in n for n in shapes)
    ex.close()


def test_mean_reduction_matches_reference(checkpoints, data_files):
    cfg, ex = _extractor(
        checkpoints["llama"], data_files["train"], 1, ["--extract.loss_reduction", "mean"]
    )
    examples, _ = load_train_examples(cfg, ex.tokenizer)
    _, grads, _ = ex.batch_gradients(examples[:3])
    reference = projected_gradients(ex.model, ex.specs, ex.projections, examples[:3], "mean")
    for name, ref in reference.items():
        torch.testing.assert_close(grads[name].reshape(3, -1), ref, rtol=1e-10, atol=1e-12)
    ex.close()


def test_gradient_checkpointing_does_not_double_count(checkpoints, data_files):
    cfg, plain = _extractor(checkpoints["llama"], data_files["train"], 2)
    examples, _ = load_train_examples(cfg, plain.tokenizer)
    _, expected, _ = plain.batch_gradients(examples[:4])
    plain.close()
    _, ckpt = _extractor(
        checkpoints["llama"], data_files["train"], 2, ["--model.gradient_checkpointing", "true"]
    )
    ckpt.model.train()  # HF enables checkpointing only in training mode; no dropout here
    _, got, _ = ckpt.batch_gradients(examples[:4])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)
    ckpt.close()


def test_module_called_twice_sums_both_calls():
    from lorif_dist.capture import GradientCapture
    from lorif_dist.modeling import LayerSpec
    from lorif_dist.projection import build_projections

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4, dtype=torch.float64)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    model = torch.nn.ModuleDict({"shared": layer})
    proj = build_projections([LayerSpec("shared", "linear", 5, 4)], 1, 0, torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    with GradientCapture(model, proj, torch.float64) as cap:
        cap.begin(torch.ones(2, 3))
        y = layer(torch.tanh(layer(x) @ torch.ones(4, 5, dtype=torch.float64)))
        (y**2).sum().backward()
        got = cap.collect()["shared"]
    # Reference: the weight gradient of the same function, per example.
    for b in range(2):
        w = layer.weight.clone().requires_grad_(True)
        f = lambda inp: torch.nn.functional.linear(inp, w, layer.bias)  # noqa: E731, B023
        out = f(torch.tanh(f(x[b]) @ torch.ones(4, 5, dtype=torch.float64)))
        (ref,) = torch.autograd.grad((out**2).sum(), w)
        torch.testing.assert_close(got[b], ref.T, rtol=1e-12, atol=1e-12)
