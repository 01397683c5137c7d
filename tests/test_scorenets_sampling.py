"""Sampling: batch-size invariance for every sampler, guidance batching and formula, output format."""

import numpy as np
import pytest
import torch

from scorenets import SAMPLERS, ScoreNet, sample, to_uint8_nhwc

SHAPE = (1, 8, 8)
LABELS = [0, 2, 1, 3, 0]  # 3 = null class (unconditional)
SEEDS = [11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def net():
    """In float64: the samplers' own arithmetic is per sample, but batched float32 convolutions may round
    differently for different batch sizes (~1e-5 here); float64 makes that rounding ~1e-15."""
    torch.manual_seed(0)
    return ScoreNet.build("tiny8", 3, SHAPE, block_out_channels=(8, 16), norm_num_groups=8).double().eval()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samples_do_not_depend_on_batch_size(net, sampler):
    extra = {"eta": 0.5} if sampler == "ddim" else {}  # make DDIM stochastic too
    full = sample(net, LABELS, SEEDS, sampler=sampler, num_steps=4, **extra)
    assert full.shape == (5, *SHAPE) and float(full.min()) >= 0 and float(full.max()) <= 1
    head = sample(net, LABELS[:2], SEEDS[:2], sampler=sampler, num_steps=4, **extra)
    torch.testing.assert_close(head, full[:2], rtol=0, atol=1e-6)
    tail = sample(net, LABELS[3:], SEEDS[3:], sampler=sampler, num_steps=4, **extra)
    torch.testing.assert_close(tail, full[3:], rtol=0, atol=1e-6)
    assert (full[0] - full[4]).abs().max() > 1e-3  # same label, different seed


def test_stochastic_steps_use_the_per_sample_generators(net):
    """DDPM adds fresh noise at every step: changing only the seed changes more than the initial noise."""
    a = sample(net, [0], [1], sampler="ddpm", num_steps=4)
    b = sample(net, [0], [1], sampler="ddpm", num_steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (sample(net, [0], [2], sampler="ddpm", num_steps=4) - a).abs().max() > 1e-3


def test_guidance_batches_cond_and_uncond_in_one_call(net):
    calls = net.forward_calls
    sample(net, [0, 1], [1, 2], sampler="ddim", num_steps=3, guidance_scale=2.0)
    assert net.forward_calls - calls == 3
    calls = net.forward_calls
    sample(net, [0, 1], [1, 2], sampler="ddim", num_steps=3)
    assert net.forward_calls - calls == 3


def test_guidance_formula_end_points(net):
    """w = 0 is the unconditional model (null labels), w = 1 the conditional one; w = 3 differs from both."""
    conditional = sample(net, [0, 1], [5, 6], sampler="dpmsolver++", num_steps=3)
    unconditional = sample(net, [3, 3], [5, 6], sampler="dpmsolver++", num_steps=3)
    torch.testing.assert_close(sample(net, [0, 1], [5, 6], sampler="dpmsolver++", num_steps=3, guidance_scale=0.0),
                               unconditional, rtol=0, atol=1e-5)
    guided = sample(net, [0, 1], [5, 6], sampler="dpmsolver++", num_steps=3, guidance_scale=3.0)
    assert (guided - conditional).abs().max() > 1e-4 and (guided - unconditional).abs().max() > 1e-4


def test_bad_arguments_raise(net):
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(net, [0], [0], sampler="euler")
    with pytest.raises(ValueError, match="labels must lie"):
        sample(net, [4], [0])
    with pytest.raises(ValueError, match="as many seeds"):
        sample(net, [0, 1], [0])
    with pytest.raises(ValueError, match="eta"):
        sample(net, [0], [0], sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="num_steps"):
        sample(net, [0], [0], num_steps=0)
    net.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            sample(net, [0], [0])
    finally:
        net.eval()


def test_to_uint8_nhwc():
    images = torch.zeros(2, 3, 4, 5)
    images[1, 2, 3, 4] = 1.0
    images[0, 0, 1, 2] = 0.5
    out = to_uint8_nhwc(images)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 5, 3)
    assert out[1, 3, 4, 2] == 255 and out[0, 1, 2, 0] == 128 and int(out.sum()) == 255 + 128
    with pytest.raises(ValueError, match="N, C, H, W"):
        to_uint8_nhwc(torch.zeros(3, 4, 5))
