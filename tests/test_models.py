"""Classifiers: shapes, in-model normalisation, the DeepMind WRN structure against a functional reference,
parameter counts against closed-form counts and published values, channels-last, the registry and parameter groups."""

import pytest
import torch
import torch.nn.functional as F

from trainlib.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASET_STATS,
    PreActResNet,
    WideResNet,
    build_model,
    param_groups,
)

SMALL = [  # (name, in_channels, image_size)
    ("wrn-10-1", 3, 16),
    ("wrn-16-2", 3, 16),
    ("preact-resnet18", 3, 16),
    ("cnn-small", 1, 8),
    ("cnn-small-bn", 1, 8),
    ("cnn-64", 1, 8),
    ("cnn-8-bn", 3, 6),
    ("mlp", 1, 8),
    ("mlp-bn", 3, 6),
]


def randomize_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BN layer non-trivial affine parameters and running statistics (so tests can see them)."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=generator).to(m.weight)
            m.bias.data = 0.2 * torch.randn(n, generator=generator).to(m.bias)
            m.running_mean.data = 0.1 * torch.randn(n, generator=generator).to(m.running_mean)
            m.running_var.data = 0.5 + torch.rand(n, generator=generator).to(m.running_var)
    return model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,channels,size", SMALL)
def test_logits_shape_for_every_model(name, channels, size):
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size)
    logits = model(torch.rand(5, channels, size, size))
    assert logits.shape == (5, 7) and torch.isfinite(logits).all()


def wrn_reference_count(depth: int, width: int, classes: int, channels: int = 3) -> int:
    """Parameters of a WRN with DeepMind's layout, counted from the architecture's definition."""
    n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    total, c_in = channels * 16 * 9, 16
    for c_out in widths[1:]:
        for i in range(n):
            a = c_in if i == 0 else c_out
            total += 2 * a + a * c_out * 9 + 2 * c_out + c_out * c_out * 9 + (a * c_out if a != c_out else 0)
        c_in = c_out
    return total + 2 * widths[3] + widths[3] * classes + classes


def test_parameter_counts_match_published_and_closed_form_values():
    with torch.device("meta"):  # no memory, no init cost: WRN-70-16 has 267M parameters
        counts = {
            (name, k): count(build_model(name, k))
            for name, k in [("wrn-28-10", 10), ("wrn-28-10", 100), ("wrn-34-10", 10), ("wrn-70-16", 10),
                            ("preact-resnet18", 10)]
        }
    assert counts["wrn-28-10", 10] == 36_479_194  # the published WRN-28-10 (CIFAR-10) count, "36.5M"
    assert counts["wrn-34-10", 10] == 46_160_474  # the published WRN-34-10 count, "46.2M"
    assert abs(counts["wrn-70-16", 10] - 267e6) < 0.5e6  # RobustBench lists WRN-70-16 as 267M
    for (name, k), value in counts.items():
        if name.startswith("wrn"):
            depth, width = map(int, name.split("-")[1:])
            assert value == wrn_reference_count(depth, width, k), name
    # PreAct ResNet-18 with the final BN (Rice et al. / SCORE code): 11,171,146 without it + 2·512
    assert counts["preact-resnet18", 10] == 11_171_146 + 1024


def test_small_cnn_counts_match_the_closed_form():
    """conv 3×3 C→c, c→c, c→2c, 2c→2c (with biases), then linear from 2c·⌈H/2⌉·⌈W/2⌉ features."""
    def reference(c, classes=10, channels=1, size=8):
        convs = channels * c * 9 + c + c * c * 9 + c + c * 2 * c * 9 + 2 * c + 2 * c * 2 * c * 9 + 2 * c
        return convs + 2 * c * ((size + 1) // 2) ** 2 * classes + classes

    assert count(build_model("cnn-small", 10, in_channels=1, image_size=8)) == reference(32) == 75_242
    assert count(build_model("cnn-64", 10, in_channels=1, image_size=8)) == reference(64)
    assert count(build_model("cnn-5", 7, in_channels=3, image_size=7)) == reference(5, 7, 3, 7)


def batch_norm_eval(h, sd, prefix):
    return F.batch_norm(h, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"],
                        sd[prefix + ".bias"], training=False, eps=1e-5)


def wrn_functional_reference(sd, x, depth):
    """DeepMind's WRN forward written out: explicit padding, conv without padding, pre-activation shortcut."""
    h = F.conv2d((x - sd["mean"]) / sd["std"], sd["init_conv.weight"], padding=1)
    for group, stride in enumerate((1, 2, 2)):
        for i in range((depth - 4) // 6):
            p, s = f"layer.{group}.block.{i}.", stride if i == 0 else 1
            a = F.silu(batch_norm_eval(h, sd, p + "batchnorm_0"))
            out = F.conv2d(F.pad(a, (1, 1, 1, 1) if s == 1 else (0, 1, 0, 1)), sd[p + "conv_0.weight"], stride=s)
            out = F.conv2d(F.silu(batch_norm_eval(out, sd, p + "batchnorm_1")), sd[p + "conv_1.weight"], padding=1)
            shortcut = F.conv2d(a, sd[p + "shortcut.weight"], stride=s) if p + "shortcut.weight" in sd else h
            h = out + shortcut
    h = F.silu(batch_norm_eval(h, sd, "batchnorm"))
    return F.linear(h.mean(dim=(2, 3)), sd["logits.weight"], sd["logits.bias"])


@pytest.mark.parametrize("depth,width", [(10, 1), (16, 2)])
def test_wrn_matches_deepmind_structure(float64, depth, width):
    model = randomize_batch_norm(WideResNet(depth, width, num_classes=5, mean=(0.3, 0.4, 0.5), std=(0.2, 0.3, 0.4)))
    model.eval()
    sd = model.state_dict()
    shortcuts = [k for k in sd if k.endswith("shortcut.weight")]
    assert len(shortcuts) == (2 if width == 1 else 3)  # 16 → 16 needs none in the first group
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(model(x), wrn_functional_reference(sd, x, depth))
    # pre-activation: in train mode BN sees the raw group input, so the first block's BN gets batch statistics
    assert isinstance(model.layer[0].block[0].relu_0, torch.nn.SiLU)


def test_preact_resnet_layout():
    model = PreActResNet()
    keys = model.state_dict().keys()
    assert {"conv1.weight", "layer2.0.shortcut.0.weight", "bn.weight", "linear.weight"} <= set(keys)
    assert "layer1.0.shortcut.0.weight" not in keys  # 64 → 64 at stride 1: identity shortcut
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.modules()) == 9  # one per block + the final one


@pytest.mark.parametrize("name,channels,size", [SMALL[1], SMALL[2], SMALL[4], SMALL[6]])
def test_normalisation_happens_inside_the_model(float64, name, channels, size):
    mean, std = tuple(0.2 + 0.1 * c for c in range(channels)), tuple(0.3 + 0.05 * c for c in range(channels))
    model = randomize_batch_norm(build_model(name, 4, channels, size, mean=mean, std=std)).eval()
    plain = build_model(name, 4, channels, size, mean=(0.0,) * channels, std=(1.0,) * channels).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    plain.load_state_dict(weights, strict=False)
    x = torch.rand(4, channels, size, size)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    torch.testing.assert_close(model(x), plain((x - m) / s))
    assert torch.equal(model.state_dict()["mean"].flatten(), torch.tensor(mean))  # saved with the weights


def test_default_statistics():
    assert torch.equal(build_model("cnn-small", 10).mean.flatten(), torch.tensor(CIFAR10_MEAN))
    assert torch.equal(build_model("cnn-small", 10).std.flatten(), torch.tensor(CIFAR10_STD))
    c100 = build_model("cnn-small", 100, mean=DATASET_STATS["cifar100"][0], std=DATASET_STATS["cifar100"][1])
    assert torch.allclose(c100.mean.flatten(), torch.tensor((0.5071, 0.4865, 0.4409)))
    assert torch.equal(build_model("mlp", 10, in_channels=1, image_size=8).std.flatten(), torch.tensor([0.5]))


@pytest.mark.parametrize("name,channels,size", [SMALL[1], SMALL[2], SMALL[4]])
def test_channels_last_gives_the_same_logits_and_gradients(name, channels, size):
    model = randomize_batch_norm(build_model(name, 4, channels, size)).eval()
    x = torch.rand(4, channels, size, size, requires_grad=True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.sum(), x)
    model = model.to(memory_format=torch.channels_last)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    logits_cl = model(x_cl)
    (grad_cl,) = torch.autograd.grad(logits_cl.sum(), x_cl)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-4, atol=1e-5)


def test_registry_rejects_bad_input():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'.*wrn-28-10.*preact-resnet18.*mlp"):
        build_model("resnet50", 10)
    with pytest.raises(ValueError, match=r"6n \+ 4"):
        build_model("wrn-27-10", 10)
    with pytest.raises(ValueError, match="one value per input channel"):
        build_model("cnn-small", 10, in_channels=1, image_size=8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="at least one channel"):
        build_model("cnn-0", 10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="unknown model 'cnn-wide'"):
        build_model("cnn-wide", 10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match="at least 8×8"):
        build_model("preact-resnet18", 10, image_size=4)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", 1)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        build_model("cnn-small", 10)(torch.rand(2, 1, 32, 32))


def test_param_groups_exempt_only_batch_norm():
    model = build_model("wrn-10-2", 10)
    decay, no_decay = param_groups(model, 5e-4)
    bn_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == bn_params
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} - bn_params
    assert id(model.logits.bias) in {id(p) for p in decay["params"]}  # biases outside BN are decayed
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)

    # one SGD step on zero gradients: only the decayed parameters shrink, by the factor (1 − lr·wd)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(param_groups(model, 0.1), lr=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1.0 if "batchnorm" in name else 1 - 0.5 * 0.1
        torch.testing.assert_close(p.detach(), before[name] * factor)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)
