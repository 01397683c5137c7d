"""benchmarks/: the host-sync and FLOP counters against known answers, sync-free training steps (counted: on the CPU
a sync costs nothing, so no clock could tell), and each benchmark end to end on tiny settings, headline last."""

import json
import os

import pytest
import torch
from torch import nn

from benchmarks.common import SyncCounter, alternate, count_flops, ratio
from benchmarks.train_step import RECIPE, TrainingStep
from scorenets import PosteriorNetPosterior, ScoreNet, build_posterior_net
from trainlib.adversarial import AdversarialConfig
from trainlib.config import load_recipe, parse_config
from trainlib.data_posterior import trajectory_provider
from trainlib.objectives import fixed_posterior


def test_sync_counter_sees_every_kind_of_host_read():
    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        y = (x * 2).exp().sum(0) + x.amax()  # device-side only
    assert syncs.total == 0 and y.dim() == 0
    with SyncCounter() as syncs:
        x.sum().item()
        bool((x > 2).any())
        float(x[0])
        torch.equal(x, x)
        x.nonzero()
        x[x > 2]
        x.tolist()
        x.cpu()
    assert syncs.counts == {"aten._local_scalar_dense": 3, "aten.equal": 1, "aten.nonzero": 1,
                            "aten.index (boolean mask)": 1, "Tensor.tolist": 1, "Tensor.cpu": 1}
    assert torch.Tensor.tolist is not None and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # methods restored


def test_flop_counter_counts_matmuls_forward_and_backward():
    layer = nn.Linear(7, 5, bias=False)
    x = torch.rand(3, 7, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * 3 * 7 * 5
    # backward: grad wrt input and wrt weight, one matmul each; works with autograd.grad on inputs (attacks)
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * (2 * 3 * 7 * 5)
    assert count_flops(lambda: torch.autograd.grad(layer(x).sum(), x)) == 2 * (2 * 3 * 7 * 5)


def test_alternation_interleaves_runs_and_ratio_is_per_round():
    order = []
    times = alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1,
                      progress=False)
    assert order == ["a", "b", "b", "a"] * 2 and [len(t) for t in times.values()] == [3, 3]  # rotated per round
    assert ratio([2.0, 4.0, 30.0], [1.0, 1.0, 10.0]) == 3.0  # median of 2, 4, 3


@pytest.mark.parametrize("variant", ["trades-se", "pgd-at", "direct-score/posterior-net", "direct-score/trajectory"])
def test_training_steps_make_no_host_sync(variant):
    """A whole optimizer step (attack, loss, backward, fused SGD, LR schedule, EMA) reads nothing back to the host;
    direct SCORE with the posterior net neither; the trajectory keeps exactly one check per attack step: whether x is
    its last point (then no call)."""
    torch.set_num_threads(1)
    objective, _, posterior = variant.partition("/")
    cfg = AdversarialConfig(model="cnn-small-bn", objective=objective, eps=0.2, step_size=0.1, pgd_steps=2,
                            batch_size=8)
    posterior_net = build_posterior_net("tiny8", 10, (1, 8, 8), 0.05, 0.5, block_out_channels=(8, 16),
                                        norm_num_groups=4).eval().requires_grad_(False)
    provider = None
    if posterior == "posterior-net":
        provider = fixed_posterior(PosteriorNetPosterior(posterior_net, cfg.noise_std))
    elif posterior == "trajectory":
        net = ScoreNet.build("tiny8", 10, (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=4)
        provider = trajectory_provider(net.eval().requires_grad_(False), cfg.noise_std, anchor_net=posterior_net)
    step = TrainingStep(cfg, 10, (1, 8, 8), provider, total_steps=10)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    step(x, y)  # first step: lazily created optimizer state
    with SyncCounter() as syncs:
        step(x, y)
    assert syncs.counts == ({"aten.equal": cfg.pgd_steps} if posterior == "trajectory" else {})


def run_benchmark(name, argv, capsys, tmp_path):
    """``python -m benchmarks.NAME ARGV`` in this process (imports shared): returns its JSON record."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    config_class = next(v for k, v in vars(module).items() if k.endswith("Config") and v.__module__ == module.__name__)
    out = tmp_path / f"{name}.json"
    capsys.readouterr()
    module.run(parse_config(config_class, [*argv, "--json", str(out)]))
    lines = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out.read_text())
    assert lines[-1] == f"headline: {record['headline']}"  # the headline is printed last
    assert record["machine"]["threads"] == 1 and len(record["load_average_start"]) == 3
    return record


COMMON = ["--repeats", "1", "--warmup", "0", "--threads", "1"]


def test_train_step_benchmark_counts_network_calls(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({**load_recipe(AdversarialConfig, RECIPE), "batch_size": 4, "pgd_steps": 2}))
    record = run_benchmark("train_step", [*COMMON, "--no-cifar", "--updates-repeats", "1", "--digits-recipe",
                                          str(recipe), "--digits-preset", "tiny8"], capsys, tmp_path)
    counts = record["results"]["digits"]["counts"]
    trajectory = counts["direct-score/trajectory"]["calls"]
    assert trajectory["score net"] == [4 * 10] * 3  # the anchor, then one call over B·K inputs per attack step
    assert trajectory["posterior net"] == [4]  # the anchor p_φ(·|x, σ) at the clean batch
    posterior_net = counts["direct-score/posterior-net"]["calls"]
    assert posterior_net == {"posterior net": [4] * 3}  # 2 attack steps + the target at x', B inputs each, no UNet
    assert "calls" not in counts["direct-score/empirical"] or counts["direct-score/empirical"]["calls"] == {}
    for name in ("trades-se", "trades-kl", "pgd-at", "direct-score/posterior-net"):
        assert counts[name]["syncs"] == {}, name
    assert record["headline"].startswith("direct SCORE with the posterior net ÷ TRADES-KL time per step: digits")


def test_attacks_benchmark(tmp_path, capsys):
    if os.environ.get("SCORE_DATAGRAD_REQUIRE_BENCH") == "1":  # .ci/run installs the extra and sets this
        import torchattacks  # noqa: F401 (required: an ImportError fails the test)
    else:
        pytest.importorskip("torchattacks", reason="benchmark-only extra: pip install -e '.[bench]' (CI runs it)")
    record = run_benchmark("attacks", [*COMMON, "--train-epochs", "1", "--n-points", "32", "--pgd-steps", "2"], capsys,
                           tmp_path)
    accuracy = record["results"]["linf"]["robust_accuracy"]
    assert set(accuracy) == {"ours", "torchattacks", "torchattacks, frozen", "ours, keep_best"}


def test_data_path_generation_and_gpu_benchmarks(tmp_path, capsys):
    data = run_benchmark("data_path", [*COMMON, "--num-images", "3000", "--shard-size", "1000", "--num-real", "500",
                                       "--batches", "2", "--model", "mlp", "--workdir", str(tmp_path)], capsys,
                         tmp_path)
    assert data["results"]["memory"]["peak over all readings"]["RssAnon"] > 0
    assert not any(tmp_path.glob("benchmark-shards-*"))  # deleted without --keep
    generation = run_benchmark("generation", [*COMMON, "--batch-size", "2", "--ddpm-steps", "3", "--ddim-steps", "2",
                                              "--dpm-steps", "2", "--cifar-preset", "none"], capsys, tmp_path)
    assert generation["results"]["calls_per_image"] == {"ddpm": 3, "ddim": 2, "dpmsolver++": 2}
    gpu = run_benchmark("gpu", [*COMMON, "--model", "wrn-10-1", "--preset", "tiny8", "--batch-size", "4",
                                "--pgd-steps", "2"], capsys, tmp_path)
    assert torch.cuda.is_available() or gpu["headline"].startswith("no GPU figures")
