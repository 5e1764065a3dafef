"""Every contraction order of the capture hooks against per-example autograd in float64."""

import pytest
import torch

from lorif_dist.capture import contraction_order
from tests.reference import projected_gradients
from tests.test_capture import _extractor


@pytest.mark.parametrize("order", ["project", "in_first", "out_first"])
@pytest.mark.parametrize("kind,padding_side", [("gpt2", "right"), ("llama", "left")])
def test_each_order_matches_per_example_autograd(
    checkpoints, data_files, order, kind, padding_side
):
    from lorif_dist.extract import load_train_examples

    cfg, ex = _extractor(
        checkpoints[kind], data_files["train"], 2, ["--extract.padding_side", padding_side]
    )
    ex.capture.order = order
    examples, _ = load_train_examples(cfg, ex.tokenizer)
    batch = examples[:5]
    assert len({e.num_tokens for e in batch}) > 1  # padding inside the batch
    _, grads, _ = ex.batch_gradients(batch)
    reference = projected_gradients(ex.model, ex.specs, ex.projections, batch)
    for name, ref in reference.items():
        got = grads[name].reshape(len(batch), -1)
        assert ref.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10 * ref.abs().max(), msg=name)
    ex.close()


def test_order_choice_follows_the_cost_model():
    # SmolLM2-135M at f = 8, 256 tokens: square layers project both sides first, the MLP's
    # up projections contract at the output width, its down projection at the input width.
    assert contraction_order(256, 576, 576, 72, 72) == "project"
    assert contraction_order(256, 576, 1536, 72, 192) == "in_first"
    assert contraction_order(256, 1536, 576, 192, 72) == "out_first"
    # Short sequences make the extra d1 O d2 term dominate: back to projecting first.
    assert contraction_order(16, 576, 1536, 72, 192) == "project"
