"""bigbatch.memory's meter: each storage once, freed when its last holder dies, what was
there before the step left out; regions, and tensors held outside autograd."""

from __future__ import annotations

import torch

from bigbatch.memory import MemoryMeter, storage_key, storage_keys

MB = 1000 * 1000 * 4  # bytes of a (1000, 1000) float32 tensor


def test_saved_bytes_count_each_storage_once_and_drop_when_freed():
    x = torch.randn(1000, 1000, requires_grad=True)
    with MemoryMeter(storage_keys(x)) as meter:
        y = (x * 2).exp()  # exp saves its output y ...
        z = y.sin().sum()  # ... and sin saves its input, the same y: one storage
        assert meter.saved.current == MB
        z.backward()
        assert meter.saved.current == 0  # the graph is freed by backward
        assert 2 * MB <= meter.live.current <= 2 * MB + 16  # y, x.grad (held in C++), the scalar z
        del y, z
        x.grad = None
        assert meter.live.current == 0
    assert meter.saved.peak == MB
    assert 2 * MB <= meter.live.peak <= 4 * MB
    assert meter.largest_tensor_bytes == MB


def test_storages_alive_before_the_step_are_not_counted():
    x = torch.randn(1000, 1000)
    weight = torch.randn(1000, 1000, requires_grad=True)
    with MemoryMeter(storage_keys(weight)) as meter:
        loss = (x.requires_grad_() @ weight.t()).sum()  # saves x and a view of weight
        del loss
    assert meter.saved.peak == MB  # x only: the weight's storage is excluded, view or not


def test_each_storage_is_put_down_to_the_region_it_was_first_saved_in():
    x = torch.randn(1000, 1000, requires_grad=True)
    with MemoryMeter(storage_keys(x), track_live=False) as meter:
        meter.region = "first"
        y = (x * 2).exp()  # saves y
        meter.region = "second"
        z = y.sin()  # saves y again (already counted) ...
        w = z.cos()  # ... and z
        logits = torch.ones(1000, 500)
        held = meter.hold(logits)  # kept for a later backward
        assert meter.saved.storages() == {storage_key(y)[0]: (MB, "first"),
                                          storage_key(z)[0]: (MB, "second"),
                                          storage_key(logits)[0]: (MB // 2, "second")}
        del held
        assert meter.saved.current == 2 * MB
        del w
        assert meter.saved.current == MB  # z's graph (the saved z) is gone; y's sin still holds y


def test_fake_tensors_count_once_per_storage():
    """The planner measures on fake tensors, which have no data to tell storages apart by."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(1000, 1000, requires_grad=True)
        with MemoryMeter(storage_keys(x), track_live=False) as meter:
            y = (x * 2).exp()
            z = (y * 3).exp()
            assert meter.saved.current == 2 * MB  # y and z; x excluded
