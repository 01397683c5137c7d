"""ScoreNet: presets, batched class scores, call counting, double backward, save/load round trip."""

import json
import math
import shutil

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from scorenets import PRESETS, ScoreNet, build_unet

SHAPE = (1, 8, 8)
TINY = dict(block_out_channels=(16, 32), norm_num_groups=8)  # test-sized tiny8


def tiny_net(num_classes=3, seed=0) -> ScoreNet:
    torch.manual_seed(seed)
    return ScoreNet.build("tiny8", num_classes, SHAPE, **TINY).eval()


PRESET_SHAPES = [("tiny8", (1, 8, 8)), ("small16", (3, 16, 16)), ("cifar32", (3, 32, 32))]


@pytest.mark.parametrize(("preset", "shape"), PRESET_SHAPES)
def test_presets_build_with_null_class_and_classic_attention(preset, shape):
    net = ScoreNet.build(preset, 10, shape)
    assert net.unet.config.num_class_embeds == 11 and net.null_class == 10
    assert net.unet.config.in_channels == net.unet.config.out_channels == shape[0]
    processors = [m.processor for m in net.unet.modules() if isinstance(m, Attention)]
    assert processors and all(type(p) is AttnProcessor for p in processors)
    if preset == "cifar32":
        assert tuple(net.unet.config.block_out_channels) == (128, 256, 256, 256)
        assert net.unet.config.dropout == 0.1
    assert set(PRESETS) == {"cifar32", "small16", "tiny8"}


def test_build_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        build_unet("huge", 10, SHAPE)
    with pytest.raises(ValueError, match="not divisible"):
        build_unet("cifar32", 10, (3, 12, 12))
    with pytest.raises(ValueError, match="H == W"):
        build_unet("tiny8", 10, (1, 8, 4))


def test_class_scores_is_one_batched_call_matching_per_class_calls():
    net = tiny_net()
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    sigma = 0.1
    with torch.no_grad():
        scores = net.class_scores(x, sigma, include_null=True)  # [5, 4, 1, 8, 8]
        assert scores.shape == (5, 4, *SHAPE) and net.forward_calls == 1
        t = torch.full((5,), net.schedule.sigma_to_t(sigma))
        u_t = (2 * x - 1) / math.sqrt(1 + 4 * sigma**2)
        for k in range(4):  # independent: one call per class, score = −ε/σ
            expected = -net(u_t, t, torch.full((5,), k)) / sigma
            torch.testing.assert_close(scores[:, k], expected, rtol=1e-5, atol=1e-5)
        calls = net.forward_calls
        chunked = net.class_scores(x, sigma, max_batch=4)  # 15 inputs → 4 calls
        assert net.forward_calls - calls == 4
        torch.testing.assert_close(chunked, scores[:, :3], rtol=1e-5, atol=1e-5)


def test_label_scores_are_the_own_label_column_of_class_scores_from_one_call():
    net = tiny_net()
    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1, 3, 3, 0])  # 3 = the null class
    with torch.no_grad():
        every = net.class_scores(x, 0.2, include_null=True)
        calls = net.forward_calls
        own = net.label_scores(x, labels, 0.2)
    assert net.forward_calls - calls == 1 and own.shape == x.shape
    torch.testing.assert_close(own, every[torch.arange(6), labels], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="labels must be a"):
        net.label_scores(x, torch.tensor([0, 4, 0, 0, 0, 0]), 0.2)


def test_class_scores_validates_inputs():
    net = tiny_net()
    with pytest.raises(ValueError, match="noise_std"):
        net.class_scores(torch.rand(2, *SHAPE), 0.0)
    with pytest.raises(ValueError, match="expected images"):
        net.class_scores(torch.rand(2, 3, 8, 8), 0.1)


def test_double_backward_through_the_unet():
    """A gradient of an input gradient must pass (the default SDPA attention processor cannot do this)."""
    net = tiny_net()
    x = torch.rand(2, *SHAPE, requires_grad=True)
    scores = net.class_scores(x, 0.1)
    (grad_x,) = torch.autograd.grad(scores.pow(2).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad and p.dim() > 1)


def test_save_and_load_round_trip(tmp_path):
    net = tiny_net(seed=3)
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        reference = net.class_scores(x, 0.2, include_null=True)
    target = net.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left behind
    assert (target / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((target / "scorenet_config.json").read_text())["num_classes"] == 3

    loaded = ScoreNet.from_pretrained(target, expected_num_classes=3)
    assert not loaded.training and loaded.preset == "tiny8" and loaded.image_shape == SHAPE
    with torch.no_grad():
        torch.testing.assert_close(loaded.class_scores(x, 0.2, include_null=True), reference, rtol=0, atol=0)
        plain = UNet2DModel.from_pretrained(target / "unet").eval()  # plain diffusers, default attention
        u_t, t, y = torch.randn(3, *SHAPE), torch.tensor([3.5, 400.0, 999.0]), torch.tensor([0, 2, 3])
        torch.testing.assert_close(plain(u_t, t, class_labels=y).sample, net(u_t, t, y), rtol=1e-5, atol=1e-5)

    tiny_net(seed=4).save_pretrained(target)  # overwriting replaces the model
    with torch.no_grad():
        assert not torch.allclose(ScoreNet.from_pretrained(target).class_scores(x, 0.2, include_null=True), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match=r"scorenet_config\.json is missing"):
        ScoreNet.from_pretrained(tmp_path / "nowhere")
    target = tiny_net().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="3 classes, expected 10"):
        ScoreNet.from_pretrained(target, expected_num_classes=10)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not load the UNet"):
        ScoreNet.from_pretrained(target)
    weights.unlink()
    torch.save({}, weights.with_suffix(".bin"))  # a pickle is never loaded in place of the safetensors file
    with pytest.raises(ValueError, match="could not load the UNet"):
        ScoreNet.from_pretrained(target)
    shutil.rmtree(target / "unet")
    with pytest.raises(ValueError, match=r"unet/config\.json is missing"):
        ScoreNet.from_pretrained(target)
    (target / "scorenet_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt"):
        ScoreNet.from_pretrained(target)


def test_from_pretrained_rejects_settings_that_disagree_with_the_unet(tmp_path):
    target = tiny_net().save_pretrained(tmp_path / "model")
    settings = json.loads((target / "scorenet_config.json").read_text())
    settings["num_classes"] = 5
    (target / "scorenet_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="does not match the settings"):
        ScoreNet.from_pretrained(target)
