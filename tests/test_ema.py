"""EMA: warm-up copy, the min(τ, (1 + δ)/(10 + δ)) ramp on a hand-computed sequence, BN buffers copied."""

import pytest
import torch
from torch import nn

from trainlib.ema import EMA


def test_decay_schedule_matches_hand_values():
    ema = EMA(nn.Linear(1, 1), tau=0.995, warmup_steps=3)
    assert [ema.decay(t) for t in (1, 2)] == [0.0, 0.0]  # warm-up: plain copy
    assert ema.decay(3) == pytest.approx(0.1)  # δ = 0
    assert ema.decay(4) == pytest.approx(2 / 11)
    assert ema.decay(3 + 1790) == pytest.approx(0.995)  # (1 + 1790)/(10 + 1790) = 0.995
    assert ema.decay(10**6) == 0.995
    fractional = EMA(nn.Linear(1, 1), warmup_steps=2.5)  # public code: 2.5 % of the step count
    assert fractional.decay(2) == 0.0 and fractional.decay(3) == pytest.approx(1.5 / 10.5)


def test_update_follows_hand_computed_sequence():
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, tau=0.3, warmup_steps=2)
    averaged = []
    for t in range(1, 7):
        model.weight.data.fill_(float(t))  # the live weight after optimizer step t
        ema.update(model)
        averaged.append(ema.model.weight.item())
    # t=1 copy → 1; then d = 0.1, 2/11, 3/12, min(0.3, 4/13) = 0.3, 0.3:
    # 0.1·1 + 0.9·2 = 1.9; (2·1.9 + 9·3)/11 = 2.8; 0.25·2.8 + 0.75·4 = 3.7; 0.3·3.7 + 0.7·5 = 4.61; 0.3·4.61 + 0.7·6
    assert averaged == pytest.approx([1.0, 1.9, 2.8, 3.7, 4.61, 5.583])
    assert ema.num_updates == 6


def test_buffers_are_copied_not_averaged_and_ema_is_detached():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, tau=0.9, warmup_steps=0)
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    for _ in range(3):
        model(torch.randn(8, 3) * 5 + 2)  # moves running statistics
        ema.update(model)
    bn, ema_bn = model[1], ema.model[1]
    assert torch.equal(ema_bn.running_mean, bn.running_mean) and torch.equal(ema_bn.running_var, bn.running_var)
    assert ema_bn.num_batches_tracked.item() == 3
    before = ema.model[0].weight.clone()
    model[0].weight.data.add_(1.0)
    assert torch.equal(ema.model[0].weight, before)  # no aliasing with the live model


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, tau=0.99, warmup_steps=1)
    for _ in range(4):
        model[0].weight.data.add_(0.1)
        ema.update(model)
    restored = EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), tau=0.99, warmup_steps=1)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 4
    model[0].weight.data.add_(0.1)
    assert ema.update(model) == restored.update(model)
    for a, b in zip(ema.model.state_dict().values(), restored.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_invalid_settings_and_mismatched_model():
    with pytest.raises(ValueError, match="tau"):
        EMA(nn.Linear(1, 1), tau=1.0)
    with pytest.raises(ValueError, match="warmup"):
        EMA(nn.Linear(1, 1), warmup_steps=-1)
    with pytest.raises(ValueError, match="do not match"):
        EMA(nn.Linear(1, 1)).update(nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)))


def test_the_average_is_of_the_module_inside_parallel_and_compile_wrappers(tmp_path):
    """DataParallel, DistributedDataParallel (one gloo process), torch.compile and compile around DDP (how
    ``accelerator.prepare`` wraps): the EMA averages the plain module, and its state dict has the plain keys."""
    import torch.distributed as dist

    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        wrappers = [nn.DataParallel(model), ddp, torch.compile(model), torch.compile(ddp)]
        for wrapped in wrappers:
            ema = EMA(wrapped, tau=0.5, warmup_steps=2)
            assert type(ema.model) is nn.Sequential and ema.model.state_dict().keys() == model.state_dict().keys()
            with torch.no_grad():
                model[0].weight.add_(1.0)
            ema.update(wrapped)  # during the warm-up an update copies
            torch.testing.assert_close(ema.model[0].weight, model[0].weight, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
