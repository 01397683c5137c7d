"""trainlib.adversarial end to end on tiny runs: run-directory layout, exact resume, direct SCORE (analytic and score
net and posterior net), evaluation command, recipes, and a 2-process CPU run against a 1-process run (bad input:
tests/test_bad_input.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.toy_demo import ToyDemoConfig
from datagrad import PGD, score_risk, toy_mixture
from scorenets import PosteriorNet, ScoreNet, build_posterior_net
from trainlib.adversarial import AdversarialConfig, DirectScoreConfig, train
from trainlib.checkpoint import load_weights, load_weights_metadata
from trainlib.classifiers import build_classifier, list_snapshots, load_classifier
from trainlib.config import config_to_dict, parse_config, read_recipe, recipe_chain
from trainlib.datasets import load_dataset
from trainlib.evaluate_command import EvaluateConfig, evaluate_checkpoint
from trainlib.posterior_training import PosteriorNetConfig
from trainlib.scorenet_training import ScoreNetConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.json"))


def tiny(tmp_path, name="run", **overrides) -> AdversarialConfig:
    """A digits run of a few steps with a small MLP (seconds on one CPU thread)."""
    options = dict(
        dataset="digits", model="mlp", objective="trades-se", eps=0.2, step_size=0.1, pgd_steps=2, batch_size=32,
        epoch_size=64, epochs=2, n_val=32, n_test=32, cpu_threads=1, checkpoint_every=1, keep_last=2, log_every=1,
        eval_batch_size=64, out=str(tmp_path / name),
    )
    options.update(overrides)
    return (DirectScoreConfig if options["objective"] == "direct-score" else AdversarialConfig)(**options)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("e2e"))
    return cfg, train(cfg)


def test_run_directory_layout(finished_run):
    cfg, results = finished_run
    run = Path(cfg.out)
    for name in ("config.json", "log.txt", "metrics.jsonl", "results.json", "ema.safetensors", "model.safetensors",
                 "best/ema.safetensors", "best/metrics.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]  # keep_last 2
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["objective"] == "trades-se" and record["run"]["world_size"] == 1
    rows = metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    validation = [r for r in rows if "val/pgd40_cw_acc" in r]
    assert [r["epoch"] for r in validation] == [1, 2]
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert best["val/pgd40_cw_acc"] == max(r["val/pgd40_cw_acc"] for r in validation)
    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    test = saved["test"]
    assert test["n_examples"] == 32 and test["eps"] == "51/255" and test["threat_model"] == "Linf"
    assert float(test["pgd_cw_acc"]) <= float(test["clean_acc"])
    info = json.loads(load_weights_metadata(run / "ema.safetensors")["trainlib"])
    assert (info["model"], info["dataset"], info["num_classes"]) == ("mlp", "digits", 10)
    assert info["image_shape"] == [1, 8, 8]


def test_evaluate_command_on_run_and_checkpoint(finished_run, tmp_path):
    cfg, _ = finished_run
    run = Path(cfg.out)
    # the final checkpoint's registered EMA state is the EMA written at the end of the run
    from_checkpoint = load_classifier(run / "checkpoints" / "step_000004")
    final = load_weights(run / "ema.safetensors")
    state = from_checkpoint.model.state_dict()
    assert from_checkpoint.settings["model"] == "mlp" and state.keys() == final.keys()
    assert all(torch.equal(state[k], final[k]) for k in final)

    record = evaluate_checkpoint(EvaluateConfig(
        checkpoint=str(run), n_examples=24, autoattack_version="apgd-ce", eps_curve=(0.0, 1.0), batch_size=24,
        out=str(tmp_path / "eval"),
    ))
    saved = json.loads((tmp_path / "eval" / "robustbench.json").read_text())
    assert saved == record and saved["n_examples"] == 24 and saved["eps"] == "51/255"
    assert float(saved["autoattack_acc"]) <= float(saved["pgd_cw_acc"]) + 0.1 <= float(saved["clean_acc"]) + 0.1
    curve = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["accuracy_vs_eps"]
    assert curve["pgd_cw_acc"][0] == pytest.approx(float(saved["clean_acc"]) / 100)  # eps 0 is clean accuracy
    assert (tmp_path / "eval" / "accuracy_vs_eps.png").stat().st_size > 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path, accumulation):
    """3 steps/epoch × 2 epochs straight vs. stopped after 4 steps (mid-epoch) and resumed: identical weights, with BN
    buffers, random PGD starts and gradient accumulation."""
    options = dict(model="mlp-bn", epoch_size=96, grad_accumulation=accumulation, checkpoint_every=2, n_test=16,
                   snapshot_every=1)
    train(tiny(tmp_path, "straight", **options))
    assert train(tiny(tmp_path, "resumed", max_steps=4, **options)) is None  # stopped early: no results
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step_000004").is_dir()
    results = train(tiny(tmp_path, "resumed", resume="latest", **options))
    for name in ("ema.safetensors", "model.safetensors"):
        straight, resumed = load_weights(tmp_path / "straight" / name), load_weights(tmp_path / "resumed" / name)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
    assert results["best_val"] == json.loads((tmp_path / "straight" / "results.json").read_text())["best_val"]
    # per-epoch snapshots: epoch 1 before the interruption, epoch 2 after resuming mid-epoch; equal to the straight ones
    snapshots = {run: list_snapshots(tmp_path / run) for run in ("straight", "resumed")}
    assert [epoch for epoch, _ in snapshots["straight"]] == [epoch for epoch, _ in snapshots["resumed"]] == [1, 2]
    for (epoch, straight), (_, resumed) in zip(snapshots["straight"], snapshots["resumed"], strict=True):
        a, b = load_weights(straight), load_weights(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a), epoch
        assert json.loads(load_weights_metadata(resumed)["trainlib"])["epoch"] == epoch
    assert all(torch.equal(v, load_weights(tmp_path / "straight" / "ema.safetensors")[k])
               for k, v in load_weights(snapshots["straight"][-1][1]).items())  # the last snapshot is the final EMA


def test_direct_score_with_analytic_posterior_lowers_the_score_risk(tmp_path):
    cfg = tiny(tmp_path, dataset="gmm-4x4", objective="direct-score", posterior="analytic", eps=0.1, step_size=0.05,
               pgd_steps=3, batch_size=128, epoch_size=1280, epochs=6, log_every=10, val_every=0, checkpoint_every=0,
               n_test=64)
    train(cfg)
    losses = [r["train/loss_robust"] for r in metrics(cfg.out) if "train/loss_robust" in r]
    assert losses[-1] < 0.8 * losses[0]
    # independent check: the SCORE risk (datagrad, exact mixture, stronger attack) on test points, before vs after
    mixture = toy_mixture("gmm-4x4")
    x, _ = load_dataset("gmm-4x4", "test").get(range(256))
    trained = build_classifier("mlp", "gmm-4x4", 3, (1, 4, 4))
    trained.load_state_dict(load_weights(Path(cfg.out) / "ema.safetensors"))
    untrained = build_classifier("mlp", "gmm-4x4", 3, (1, 4, 4))
    attack = PGD(eps=0.1, step_size=0.025, steps=10, norm="linf", clamp=None)
    risk = lambda model: score_risk(model.eval(), x, mixture, attack, "kl", generator=torch.Generator().manual_seed(0))
    assert risk(trained) < 0.5 * risk(untrained)


def _save_scorenet(path, num_classes):
    net = ScoreNet.build("tiny8", num_classes, (1, 8, 8), block_out_channels=(8, 16), norm_num_groups=4)
    net.save_pretrained(path)
    return path


def _save_posterior_net(path, num_classes):
    net = build_posterior_net("tiny8", num_classes, (1, 8, 8), 0.05, 0.5, block_out_channels=(8, 16),
                              norm_num_groups=4)
    net.save_pretrained(path, safe_serialization=True)
    return path


def test_direct_score_with_the_posterior_net_anchor_calls_it_once_per_batch(tmp_path, monkeypatch):
    """posterior=scorenet with the default anchor: one posterior-net pass over the clean batch (the anchor, no
    gradient), then the trajectory's calls, the same as with the label anchor."""
    calls = []
    original = PosteriorNet.forward
    monkeypatch.setattr(PosteriorNet, "forward", lambda self, x, s: (calls.append((x.shape[0], torch.is_grad_enabled()))
                                                                     or original(self, x, s)))
    cfg = tiny(tmp_path, objective="direct-score", posterior="scorenet",
               scorenet=str(_save_scorenet(tmp_path / "scorenet", 10)),
               posterior_net=str(_save_posterior_net(tmp_path / "posterior", 10)), batch_size=8, epoch_size=16,
               epochs=1, pgd_steps=2, val_every=0, n_test=8)
    train(cfg)
    assert calls == [(cfg.batch_size, False)] * 2  # two training steps, one anchor each


def test_direct_score_with_the_posterior_net_makes_no_scorenet_call(tmp_path, monkeypatch):
    """posterior=posterior-net: per training step one posterior-net pass per attack step (with an input gradient), one
    at the last iterate (no gradient), no score net at all; training runs and logs finite losses."""
    calls = []
    original = PosteriorNet.forward
    monkeypatch.setattr(PosteriorNet, "forward", lambda self, x, s: (calls.append((x.shape[0], torch.is_grad_enabled()))
                                                                     or original(self, x, s)))
    monkeypatch.setattr(ScoreNet, "from_pretrained", None)  # any score-net load would fail
    cfg = tiny(tmp_path, objective="direct-score", posterior_net=str(_save_posterior_net(tmp_path / "posterior", 10)),
               scorenet=None, batch_size=8, epoch_size=16, epochs=1, pgd_steps=2, val_every=0, n_test=8)
    train(cfg)
    per_step = [(cfg.batch_size, True)] * cfg.pgd_steps + [(cfg.batch_size, False)]
    assert calls == per_step * 2
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in metrics(cfg.out) if "train/loss" in r)


def test_direct_score_with_a_posterior_net_ensemble_evaluates_every_member(tmp_path, monkeypatch):
    """--posterior-ensemble: each call of p_d evaluates the posterior net and every further net on the same inputs
    (the ensemble's mean); the run records the ensemble in its config."""
    calls = []
    original = PosteriorNet.forward
    monkeypatch.setattr(PosteriorNet, "forward", lambda self, x, s: (calls.append((id(self), x.shape[0]))
                                                                     or original(self, x, s)))
    cfg = tiny(tmp_path, objective="direct-score", posterior_net=str(_save_posterior_net(tmp_path / "a", 10)),
               posterior_ensemble=(str(_save_posterior_net(tmp_path / "b", 10)),), scorenet=None, batch_size=8,
               epoch_size=16, epochs=1, pgd_steps=2, val_every=0, n_test=8)
    train(cfg)
    members = sorted({net for net, _ in calls})
    assert len(members) == 2 and len(calls) == 2 * 2 * (cfg.pgd_steps + 1)  # 2 steps × 2 nets × (attack + target)
    assert {net for net, _ in calls[0::2]} != {net for net, _ in calls[1::2]}  # each call: one member, then the other
    assert len({net for net, _ in calls[0::2]}) == 1 and {size for _, size in calls} == {cfg.batch_size}
    saved = json.loads((Path(cfg.out) / "config.json").read_text())["config"]
    assert saved["posterior_ensemble"] == [str(tmp_path / "b")]


def test_direct_score_with_scorenet_makes_one_call_per_attack_step(tmp_path, monkeypatch):
    loaded = []
    original = ScoreNet.from_pretrained.__func__

    inputs = []  # UNet inputs of every call

    def spy(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        loaded[-1].register_forward_pre_hook(lambda module, args: inputs.append(args[0].shape[0]))
        return loaded[-1]

    monkeypatch.setattr(ScoreNet, "from_pretrained", classmethod(spy))
    scorenet_dir = _save_scorenet(tmp_path / "scorenet", 10)
    cfg = tiny(tmp_path, objective="direct-score", posterior="scorenet", anchor="label", scorenet=str(scorenet_dir),
               batch_size=8, epoch_size=16, epochs=1, pgd_steps=2, val_every=0, n_test=8)
    train(cfg)
    (scorenet,) = loaded
    training_steps = 2
    assert scorenet.forward_calls == training_steps * (1 + cfg.pgd_steps)  # the anchor + one batched call per PGD step
    assert inputs == [cfg.batch_size * 10] * scorenet.forward_calls  # each call: all K classes of the batch at once
    assert not scorenet.training and not any(p.requires_grad for p in scorenet.parameters())
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in metrics(cfg.out) if "train/loss" in r)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_are_valid(recipe, capsys):
    kinds = {"toy-demo": ToyDemoConfig, "scorenet-": ScoreNetConfig, "posterior-": PosteriorNetConfig}
    config_class = next((cls for prefix, cls in kinds.items() if recipe.stem.startswith(prefix)), AdversarialConfig)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(config_class, ["--config", str(recipe), "--dry-run"])
    assert exit_info.value.code == 0
    resolved = json.loads(capsys.readouterr().out)
    written = read_recipe(recipe)  # its own values over those of the recipes it extends
    assert {k: resolved[k] for k in written} == written  # JSON in, JSON out: the same numbers
    chain = recipe_chain(recipe)  # it holds only what differs from its base, and its base chain stays short
    if len(chain) > 1:
        base, own = read_recipe(chain[-2][0]), chain[-1][1]
        assert not [k for k, v in own.items() if k in base and base[k] == v], "restates its base's values"
    assert len(chain) - 1 <= 3, f"{recipe.stem} extends a chain of {len(chain) - 1} recipes; at most 3 keep it readable"


def test_table4_recipes_cover_every_row():
    names = {p.stem for p in RECIPES}
    rows = ["cifar10-linf-wrn-28-10", "cifar10-linf-wrn-70-16", "cifar10-l2-wrn-28-10", "cifar100-linf-wrn-28-10",
            "cifar100-linf-wrn-70-16"]
    assert {f"{row}-{tag}" for row in rows for tag in ("kl", "se-beta3", "se-beta4")} <= names
    for row in rows:
        recipe = read_recipe(ROOT / "recipes" / f"{row}-se-beta4.json")
        assert (recipe["batch_size"], recipe["epochs"], recipe["lr"], recipe["epoch_size"]) == (512, 400, 0.2, 50000)
        assert recipe["unsup_fraction"] == 0.7 and recipe["ema_tau"] == 0.995 and recipe["weight_decay"] == 5e-4
        assert recipe["eps"] == pytest.approx(8 / 255 if "linf" in row else 128 / 255)


# -- two processes on the CPU ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_cpu_run_equals_one_process_run(tmp_path):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 (docs/conventions.md §7): both ranks run,
    and with a model without BN and no random starts the result equals a one-process run on the same global batches."""
    options = ["--model", "cnn-small", "--objective", "standard", "--batch-size", "32", "--epoch-size", "128",
               "--epochs", "1", "--n-val", "32", "--n-test", "32", "--cpu-threads", "1", "--checkpoint-every", "2",
               "--keep-last", "5", "--num-processes", "2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "TRAINLIB_DEBUG": "1"}
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "0", str(ROOT / "train" / "train_classifier.py")]
    result = subprocess.run([*launch, *options, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "config.json").read_text())["run"]["world_size"] == 2
    for step in (2, 4):  # every rank wrote its RNG state into every checkpoint
        folder = two / "checkpoints" / f"step_{step:06d}"
        assert {p.name for p in folder.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    one_options = [o if o != "2" or options[i - 1] != "--num-processes" else "1" for i, o in enumerate(options)]
    train(parse_config(AdversarialConfig, [*one_options, "--out", str(tmp_path / "one")]))
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(two / name), load_weights(tmp_path / "one" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_direct_score_defaults_are_the_digits_recipe():
    """``train/direct_score.py`` with no flags runs recipes/digits-direct-score.json (the README's main command)."""
    recipe = {k: v for k, v in json.loads((ROOT / "recipes" / "digits-direct-score.json").read_text()).items()
              if not k.startswith("_")}
    defaults = config_to_dict(DirectScoreConfig())
    assert {k: defaults[k] for k in recipe} == recipe


def test_cores_per_process_shares_this_process_cores_among_the_local_processes(monkeypatch):
    from trainlib.accelerator import cores_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cores_per_process() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert cores_per_process() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert cores_per_process() == 1


def test_missing_default_nets_are_trained_first_on_every_core_then_reused(tmp_path, monkeypatch):
    """The one-command job in a fresh directory: the default score net, then the posterior net that needs it, each
    announced, with every core (not the launcher's OMP_NUM_THREADS=1); a second run trains nothing; a run naming
    another posterior net trains nothing either."""
    from trainlib import data_posterior, posterior_training, scorenet_training

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    trained = []

    def fake_train(subdir):
        def run(cfg):
            trained.append((cfg.out, cfg.cpu_threads, cfg.resume, getattr(cfg, "scorenet", None)))
            (Path(cfg.out) / subdir).mkdir(parents=True)
            (Path(cfg.out) / subdir / "config.json").write_text("{}")
        return run

    monkeypatch.setattr(scorenet_training, "train", fake_train(scorenet_training.SCORENET_SUBDIR))
    monkeypatch.setattr(posterior_training, "train", fake_train(posterior_training.POSTERIOR_SUBDIR))
    said = []
    data_posterior.ensure_default_nets(DirectScoreConfig(), announce=said.append)
    assert trained == [("runs/scorenet-digits", 6, "none", None),
                       ("runs/posterior-digits", 6, "none", "runs/scorenet-digits")]
    assert [line.split(":")[0] for line in said] == ["no score net at runs/scorenet-digits",
                                                     "no posterior net at runs/posterior-digits"]
    data_posterior.ensure_default_nets(DirectScoreConfig(), announce=said.append)
    data_posterior.ensure_default_nets(DirectScoreConfig(posterior_net=str(tmp_path / "other")), announce=said.append)
    assert len(trained) == 2 and len(said) == 2


def test_an_interrupted_default_posterior_net_is_resumed_not_reused(tmp_path, monkeypatch):
    """A default run cut off after a checkpoint holds an intermediate EMA net (posterior_net/) but no results.json:
    the one-command job resumes it rather than train against the unfinished net."""
    from trainlib import data_posterior, posterior_training

    monkeypatch.chdir(tmp_path)
    for run, subdir in (("runs/scorenet-digits", "scorenet"), ("runs/posterior-digits", "posterior_net")):
        (tmp_path / run / subdir).mkdir(parents=True)
        (tmp_path / run / subdir / "config.json").write_text("{}")
        (tmp_path / run / "config.json").write_text("{}")
    (tmp_path / "runs/scorenet-digits/results.json").write_text("{}")  # the score net finished, the posterior net not
    trained = []
    monkeypatch.setattr(posterior_training, "train", lambda cfg: trained.append((cfg.out, cfg.resume)))
    data_posterior.ensure_default_nets(DirectScoreConfig(), announce=lambda line: None)
    assert trained == [("runs/posterior-digits", "latest")]
