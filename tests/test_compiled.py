"""--torchcompile: compiled, the engine still gives the large-batch gradient.

The fast test compiles through a counting backend that runs the captured graphs eagerly:
it checks that dynamo's capture does not disturb the replayed randomness and that uneven
micro-batches recompile at most twice per grad mode. The slow test compiles with CPU
inductor (minutes of compile on 2 cores), where random ops must come from the replayed
generators (`fallback_random`).
"""

from __future__ import annotations

import pytest
import torch

from bigbatch.compiled import compile_model
from bigbatch.losses import ClipLoss
from test_accumulation import assert_grad_close, cached, grads, reference_backward
from tiny_models import open_clip_vit, uint8_batches


def compiled_pair(backend):
    torch.manual_seed(1234)
    ref, ours = open_clip_vit(dropout=0.2, patch_dropout=0.25), open_clip_vit(dropout=0.2, patch_dropout=0.25)
    ours.load_state_dict(ref.state_dict())
    return compile_model(ref.train(), backend), compile_model(ours.train(), backend)


def check_exact(ref, ours, sizes):
    mbs = [(images.float() / 255, texts) for images, texts in uint8_batches(sizes)]
    reference_backward(ref, mbs, ClipLoss(), seed=3)
    cached(ours, mbs, ClipLoss(), seed=3)
    expected, actual = grads(ref), grads(ours)
    assert expected.keys() == actual.keys() and "logit_scale" in actual
    for name in expected:
        assert_grad_close(actual[name], expected[name], name)
    assert list(ours.state_dict()) == list(open_clip_vit().state_dict())  # names unchanged


def test_compiled_capture_keeps_the_gradient_exact_and_recompiles_at_most_twice():
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    check_exact(*compiled_pair(counting), [8, 8, 5])
    captured = len(graphs)
    assert 2 <= captured <= 4  # per grad mode: a static graph for 8, one dynamic for the rest
    for sizes in ([8, 8, 5], [8, 8, 3], [8, 6, 2], [4, 4, 4]):  # new models, new sizes
        check_exact(*compiled_pair(counting), sizes)
    assert len(graphs) == captured  # no recompile for any other micro-batch size
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_replays_dropout_exactly():
    import torch._dynamo

    torch._dynamo.reset()
    check_exact(*compiled_pair("inductor"), [8, 8, 5])
    torch._dynamo.reset()


def test_uint8_images_compile_once_per_grad_mode():
    """The image tower's uint8 normalisation (a forward pre-hook) holds its constants from
    the start: a second step captures no new graph."""
    import torch._dynamo

    from bigbatch.accumulation import cached_backward
    from bigbatch.model import create_model

    torch._dynamo.reset()
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    net = compile_model(create_model("bigbatch-tiny").model.train(), counting)
    batches = uint8_batches([4, 4])  # one no-grad forward in the first step, then one with grad
    assert batches[0][0].dtype == torch.uint8
    cached_backward(net, batches, ClipLoss())
    first_step = len(graphs)
    assert first_step >= 2  # pass 1's no-grad graph and the training graph
    cached_backward(net, batches, ClipLoss())
    assert len(graphs) == first_step
    torch._dynamo.reset()
