"""The bad-input matrix: every command-line entry point, fed missing or invalid paths, npz files with wrong dtypes,
shapes or labels, non-positive eps / σ / steps, unknown names, mismatched class counts between score net, classifier
and data, recipes with unknown keys or malformed JSON, and a checkpoint carrying a pickle payload.

Each row asserts: exit status 2 (bad input, ``trainlib.cli.InputError``), exactly one line on stderr that starts
with "error:" and names the problem (the row's substring), no traceback, and no output: the working directory
(default output paths are relative to it) is still empty, ``--out`` does not exist, and the prepared inputs are
unchanged. Rows run in this process through the real entry point
(``runpy``, as ``python train/x.py`` / ``python -m pkg.mod`` would), a few also as subprocesses.

Adding a command: one line in ``ENTRY_POINTS`` (it gets the generic recipe/flag rows when it uses
``trainlib.config.parse_config``), then its own rows in ``ROWS``. The README lists the rows."""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from scorenets import ScoreNet, build_posterior_net
from trainlib.checkpoint import save_weights, write_manifest
from trainlib.classifiers import WEIGHTS_METADATA_KEY, build_classifier
from trainlib.generation import GenerateConfig, generate

ROOT = Path(__file__).resolve().parent.parent

# name -> script path (relative to the repository) or module name; True: it parses options with parse_config
ENTRY_POINTS = {
    "train_scorenet": ("train/train_scorenet.py", True),
    "train_classifier": ("train/train_classifier.py", True),
    "direct_score": ("train/direct_score.py", True),
    "train_posterior": ("train/train_posterior.py", True),
    "evaluate": ("train/evaluate.py", True),
    "generate": ("train/generate.py", True),
    "quality": ("trainlib.quality", True),
    "compare_objectives": ("analysis.compare_objectives", True),
    "score_risk": ("analysis.score_risk", True),
    "validate_posterior": ("analysis.validate_posterior", True),
    "toy_demo": ("analysis.toy_demo", True),
    "alignment": ("analysis.alignment", True),
    "smoothing": ("analysis.smoothing", True),
    "dynamics": ("analysis.dynamics", True),
    "saliency": ("analysis.saliency", True),
    "report": ("analysis.report", True),
}


@dataclass(frozen=True)
class Row:
    entry: str
    argv: tuple[str, ...]  # "{in}" is the prepared inputs folder, "{out}" an output path that must not appear
    names: str  # substring of the error line
    subprocess: bool = False


def row(entry, names, *argv, subprocess=False) -> Row:
    return Row(entry, tuple(argv), names, subprocess)


def generic_rows() -> list[Row]:
    """Rows every entry point gets: recipe files (parse_config) and an unknown flag."""
    parsed = [entry for entry, (_, uses_parse_config) in ENTRY_POINTS.items() if uses_parse_config]
    recipes = [("unknown key 'bogus_option' in recipe", "unknown-key.json"), ("is not valid JSON", "malformed.json"),
               ("recipe file not found", "missing.json")]
    rows = [row(entry, names, "--config", f"{{in}}/recipes/{file}") for entry in parsed for names, file in recipes]
    return rows + [row(entry, "unrecognized arguments: --no-such-option", "--out", "{out}", "--no-such-option", "1")
                   for entry in ENTRY_POINTS]


GENERIC = generic_rows()
SN, CLF = ["--out", "{out}", "--train-steps", "2"], ["--out", "{out}", "--epochs", "1", "--cpu-threads", "1"]
TRAJ = [*CLF, "--posterior", "scorenet", "--anchor", "label"]  # direct SCORE on the label-anchored score-net path
ROWS = [
    *GENERIC,
    # score-net training: data files, values, names
    row("train_scorenet", "npz file not found", *SN, "--dataset", "npz:{in}/missing.npz"),
    row("train_scorenet", "not a valid .npz file", *SN, "--dataset", "npz:{in}/npz/corrupt.npz"),
    row("train_scorenet", "missing key(s) ['label']", *SN, "--dataset", "npz:{in}/npz/no-label.npz"),
    row("train_scorenet", "'image' must be uint8 (0..255) or float32", *SN, "--dataset",
        "npz:{in}/npz/int32-images.npz"),
    row("train_scorenet", "'image' must have shape (N, H, W, C)", *SN, "--dataset", "npz:{in}/npz/3d-images.npz"),
    row("train_scorenet", "float 'image' values must lie in [0, 1]", *SN, "--dataset", "npz:{in}/npz/range.npz"),
    row("train_scorenet", "'label' must hold integers", *SN, "--dataset", "npz:{in}/npz/float-labels.npz"),
    row("train_scorenet", "negative label -1", *SN, "--dataset", "npz:{in}/npz/negative-label.npz"),
    row("train_scorenet", "train_steps must be >= 1, got 0", "--out", "{out}", "--train-steps", "0"),
    row("train_scorenet", "--steps was renamed --train-steps", "--out", "{out}", "--steps", "2"),
    row("train_scorenet", "batch_size must be >= 1, got -8", *SN, "--batch-size", "-8"),
    row("train_scorenet", "unknown UNet preset 'huge'", *SN, "--preset", "huge"),
    row("train_scorenet", "unknown dataset 'mnist'", *SN, "--dataset", "mnist"),
    row("train_scorenet", "needs 2 block widths, each a multiple of its 8 norm groups", *SN, "--channels", "8", "12"),
    row("train_scorenet", "argument --train-steps: invalid int value: 'many'", "--out", "{out}", "--train-steps",
        "many"),
    row("train_scorenet", "label_dropout must be < 1, got 1.5", *SN, "--label-dropout", "1.5"),
    row("train_scorenet", "batch_size 10 must be divisible by grad_accumulation 3", *SN, "--batch-size", "10",
        "--grad-accumulation", "3"),
    row("train_scorenet", "missing key(s) ['image']", *SN, "--dataset", "npz:{in}/npz/no-image.npz"),
    row("train_scorenet", "argument --nonfinite: invalid", *SN, "--nonfinite", "ignore"),
    row("train_scorenet", "collective_timeout must be > 0, got 0.0", *SN, "--collective-timeout", "0"),
    row("train_scorenet", "checkpoint to resume from not found", *SN, "--resume", "{in}/no-checkpoint"),
    # classifier training
    row("train_classifier", "eps must be > 0, got -0.1", *CLF, "--eps", "-0.1"),
    row("train_classifier", "eps must be > 0, got 0.0", *CLF, "--eps", "0"),
    row("train_classifier", "pgd_steps must be >= 1, got 0", *CLF, "--pgd-steps", "0"),
    row("train_classifier", "--steps was renamed --pgd-steps", *CLF, "--steps", "3"),
    row("train_classifier", "key 'steps' in recipe", *CLF, "--config", "{in}/recipes/old-steps.json"),
    row("train_classifier", "unknown dataset 'mnist'", *CLF, "--dataset", "mnist"),
    row("train_classifier", "not a valid .npz file", *CLF, "--generated", "{in}/npz/corrupt.npz"),
    row("train_classifier", "asked for 2 process", *CLF, "--num-processes", "2"),
    row("train_classifier", "an l-inf eps above 1 covers the whole", *CLF, "--eps", "2"),
    row("train_classifier", "unknown model", *CLF, "--model", "resnet-9000"),
    row("train_classifier", "'image' must be uint8 (0..255) or float32", *CLF, "--dataset",
        "npz:{in}/npz/int32-images.npz", subprocess=True),
    row("train_classifier", "unknown objective 'madry'", *CLF, "--objective", "madry"),
    row("train_classifier", "label 5 out of range for 3 classes", *CLF, "--dataset", "npz:{in}/split/data_{split}.npz"),
    row("train_classifier", "label 12 out of range for 10 classes", *CLF, "--generated", "{in}/generated/labels-12"),
    row("train_classifier", "generated images are (1, 4, 4), real ones (1, 8, 8)", *CLF, "--generated",
        "{in}/generated/4x4"),
    row("train_classifier", "no .npz shards found", *CLF, "--generated", "{in}/generated/none-*.npz"),
    row("train_classifier", "posterior=analytic needs a dataset with a closed-form posterior", *CLF, "--objective",
        "direct-score"),
    row("train_classifier", "attack_gradient 'model' is used by direct-score only, not 'trades-se'", *CLF,
        "--objective", "trades-se", "--attack-gradient", "model"),
    # direct SCORE: the score net and the posterior net against the data
    row("direct_score", "score net not found", *TRAJ, "--scorenet", "{in}/missing-scorenet"),
    row("direct_score", "holds a score net for 3 classes, expected 10", *TRAJ, "--scorenet", "{in}/sn-3class-8x8"),
    row("direct_score", "was trained on images (1, 4, 4), the data are (1, 8, 8)", *TRAJ, "--scorenet",
        "{in}/sn-10class-4x4"),
    row("direct_score", "is not a saved ScoreNet", *TRAJ, "--scorenet", "{in}/npz"),
    row("direct_score", "noise_std must be > 0, got 0.0", *TRAJ, "--scorenet", "{in}/sn-3class-8x8", "--noise-std",
        "0"),
    row("direct_score", "anchor_smoothing must be > 0, got 0.0", *CLF, "--anchor-smoothing", "0"),
    row("direct_score", "several attack_losses or attack_starts need a path-independent posterior", *TRAJ,
        "--scorenet", "{in}/sn-3class-8x8", "--attack-losses", "distance", "data-margin"),
    row("direct_score", "several attack_losses or attack_starts need a path-independent posterior", *TRAJ,
        "--scorenet", "{in}/sn-3class-8x8", "--attack-starts", "2"),
    row("train_classifier", "attack_losses ['data-margin'] are used by direct-score only, not 'pgd-at'", *CLF,
        "--objective", "pgd-at", "--attack-losses", "data-margin"),
    row("direct_score", "attack_losses ['distance', 'distance'] repeat an attack", *CLF, "--attack-losses",
        "distance", "distance"),
    row("train_classifier", "attack_starts must be an integer >= 1 and is used by objectives with an attack only; "
        "got 2 for 'standard'", *CLF, "--objective", "standard", "--attack-starts", "2"),
    row("train_classifier", "attack_starts must be >= 1", *CLF, "--attack-starts", "0"),
    row("direct_score", "posterior net not found", *CLF, "--posterior-net", "{in}/missing-posterior"),
    row("direct_score", "holds a posterior net for 3 classes, expected 10", *CLF, "--posterior-net",
        "{in}/pn-3class-8x8"),
    row("direct_score", "is not a saved posterior net", *CLF, "--posterior-net", "{in}/npz"),
    row("direct_score", "pn-10class-4x4 was trained on images (1, 4, 4), the data are (1, 8, 8)", *CLF,
        "--posterior-net", "{in}/pn-10class-4x4"),
    row("direct_score", "outside the posterior net's trained range [0.05, 0.5]", *CLF, "--posterior-net",
        "{in}/pn-10class-8x8", "--noise-std", "0.8"),
    row("direct_score", "holds a posterior net for 3 classes, expected 10", *CLF, "--posterior-net",
        "{in}/pn-10class-8x8", "--posterior-ensemble", "{in}/pn-10class-8x8", "{in}/pn-3class-8x8"),
    row("direct_score", "--posterior-ensemble adds posterior nets, but posterior=empirical", *CLF, "--posterior",
        "empirical", "--posterior-ensemble", "{in}/pn-10class-8x8"),
    row("direct_score", "posterior net not found", *TRAJ[:-2], "--anchor", "posterior-net", "--scorenet",
        "{in}/sn-10class-8x8", "--posterior-net", "{in}/missing-posterior"),
    row("direct_score", "argument --anchor: invalid Literal value: 'oracle'", *CLF, "--posterior", "scorenet",
        "--anchor", "oracle"),
    # posterior-net training
    row("train_posterior", "need 0 < sigma_min < sigma_max", *SN, "--sigma-min", "0.5", "--sigma-max", "0.1"),
    row("train_posterior", "the DLSM term needs a score net", *SN, "--scorenet", "none"),
    row("train_posterior", "ce_weight must be > 0", *SN, "--ce-weight", "0"),
    row("train_posterior", "--train-samples draws from a known distribution", *SN, "--train-samples", "100"),
    row("train_posterior", "unknown posterior-net preset 'huge'", *SN, "--preset", "huge"),
    row("train_posterior", "score net not found", *SN, "--scorenet", "{in}/missing-scorenet"),
    row("train_posterior", "holds a score net for 3 classes, expected 10", *SN, "--scorenet", "{in}/sn-3class-8x8"),
    row("train_posterior", "outside the schedule's range", *SN, "--scorenet", "{in}/sn-10class-8x8", "--sigma-max",
        "100"),
    row("train_posterior", "train_steps must be >= 1, got 0", *SN, "--scorenet", "{in}/sn-10class-8x8",
        "--train-steps", "0"),
    # evaluation: weights against model and data, unsafe or corrupt checkpoints
    row("evaluate", "checkpoint not found", "--out", "{out}", "--checkpoint", "{in}/missing-run"),
    row("evaluate", "refusing to load", "--out", "{out}", "--checkpoint", "{in}/checkpoints/step_000001",
        subprocess=True),
    row("evaluate", "cannot evaluate checkpoint", "--out", "{out}", "--checkpoint", "{in}/checkpoints/step_000002"),
    row("evaluate", "not a valid safetensors file", "--out", "{out}", "--checkpoint", "{in}/pickle.safetensors"),
    row("evaluate", "do not fit model 'mlp' on digits", "--out", "{out}", "--checkpoint",
        "{in}/classifier-3class.safetensors", "--dataset", "digits"),
    row("evaluate", "unknown dataset 'mnist'", "--out", "{out}", "--checkpoint", "{in}/classifier-digits.safetensors",
        "--dataset", "mnist"),
    row("evaluate", "unknown model", "--out", "{out}", "--checkpoint", "{in}/classifier-digits.safetensors", "--model",
        "resnet-9000"),
    row("evaluate", "eps must be > 0, got -1.0", "--out", "{out}", "--eps", "-1"),
    row("evaluate", "pgd_steps must be >= 1, got 0", "--out", "{out}", "--pgd-steps", "0"),
    row("evaluate", "n_examples must be >= 1, got 0", "--out", "{out}", "--n-examples", "0"),
    # generation: score net, filter classifier, values, an output made with other settings
    row("generate", "score net not found", "--out", "{out}", "--scorenet", "{in}/missing-scorenet"),
    row("generate", "is not a saved ScoreNet", "--out", "{out}", "--scorenet", "{in}/sn-corrupt"),
    row("generate", "corrupt", "--out", "{out}", "--scorenet", "{in}/sn-bad-config"),
    row("generate", "filter classifier", "--out", "{out}", "--scorenet", "{in}/sn-3class-8x8", "--filter-classifier",
        "{in}/classifier-digits.safetensors"),
    row("generate", "checkpoint not found", "--out", "{out}", "--scorenet", "{in}/sn-3class-8x8",
        "--filter-classifier", "{in}/missing.safetensors"),
    row("generate", "num_images must be >= 1, got 0", "--out", "{out}", "--num-images", "0"),
    row("generate", "sampler_steps must be >= 1, got 0", "--out", "{out}", "--sampler-steps", "0"),
    row("generate", "--steps was renamed --sampler-steps", "--out", "{out}", "--steps", "1"),
    row("generate", "guidance_scale must be a finite number >= 0, got -1.0", "--out", "{out}", "--guidance-scale",
        "-1"),
    row("generate", "keep_fraction must be > 0, got 0.0", "--out", "{out}", "--keep-fraction", "0"),
    row("generate", "argument --sampler: invalid", "--out", "{out}", "--sampler", "euler"),
    row("generate", "holds images generated with other settings (seed: 0 -> 1)", "--out", "{in}/generated-run",
        "--scorenet", "{in}/sn-3class-8x8", "--num-images", "3", "--shard-size", "3", "--sampler-steps", "1", "--seed",
        "1"),
    # quality report: generated data against the dataset and the classifier
    row("quality", "no .npz shards found", "--out", "{out}", "--generated", "{in}/generated/none-*.npz"),
    row("quality", "generated images are (1, 4, 4) (C, H, W), digits images are (1, 8, 8)", "--out", "{out}",
        "--generated", "{in}/generated/4x4"),
    row("quality", "label 12 out of range for 10 classes", "--out", "{out}", "--generated",
        "{in}/generated/labels-12"),
    row("quality", "'image' must be uint8", "--out", "{out}", "--generated", "{in}/npz/int32-images.npz"),
    row("quality", "is for 3 classes", "--out", "{out}", "--generated", "{in}/generated/digits", "--classifier",
        "{in}/classifier-3class.safetensors"),
    row("quality", "unknown dataset 'mnist'", "--out", "{out}", "--dataset", "mnist"),
    row("quality", "epochs must be > 0, got 0", "--out", "{out}", "--epochs", "0"),
    row("quality", "missing key(s) ['label']", "--out", "{out}", "--generated", "{in}/npz/no-label.npz"),
    # analysis commands
    row("compare_objectives", "recipe file not found", "--out", "{out}", "--recipes", "{in}/recipes/missing.json"),
    row("compare_objectives", "is not valid JSON", "--out", "{out}", "--recipes", "{in}/recipes/malformed.json"),
    row("compare_objectives", "unknown key 'bogus_option'", "--out", "{out}", "--recipes",
        "{in}/recipes/unknown-key.json"),
    row("compare_objectives", "n_test must be >= 1, got 0", "--out", "{out}", "--n-test", "0"),
    row("compare_objectives", "budget recipe file not found", "--out", "{out}", "--budget",
        "{in}/recipes/missing.json"),
    row("compare_objectives", "paired_with must name one of the compared recipes", "--out", "{out}", "--paired-with",
        "pgd-at"),
    row("score_risk", "give at least one run directory", "--out", "{out}"),
    row("score_risk", "checkpoint not found", "{in}/missing-run", "--out", "{out}"),
    row("score_risk", "argument --truth: invalid Literal value: 'oracle'", "{in}/classifier-digits.safetensors",
        "--truth", "oracle", "--out", "{out}"),
    row("score_risk", "noise_std σ must be a positive finite number", "{in}/classifier-digits.safetensors",
        "--truth", "empirical", "--noise-std", "0", "--out", "{out}"),
    row("score_risk", "digits has no closed-form posterior", "{in}/classifier-digits.safetensors", "--out", "{out}"),
    row("validate_posterior", "recipe file not found", "--out", "{out}", "--recipe", "{in}/recipes/missing.json"),
    row("validate_posterior", "is not a direct-SCORE recipe", "--out", "{out}", "--recipe",
        str(ROOT / "recipes" / "digits-trades-se.json")),
    row("validate_posterior", "estimators must be among", "--out", "{out}", "--estimators", "oracle"),
    row("validate_posterior", "n_points must be >= 1, got 0", "--out", "{out}", "--n-points", "0"),
    row("validate_posterior", "noise_std σ must be a positive finite number", "--out", "{out}", "--sigmas", "-0.1"),
    row("validate_posterior", "checkpoint not found", "--out", "{out}", "--classifier", "{in}/missing-run"),
    row("validate_posterior", "was trained on 'gmm-4x4', the recipe is for 'digits'", "--out", "{out}",
        "--classifier", "{in}/classifier-3class.safetensors"),
    row("toy_demo", "iterations must be >= 1, got 0", "--out", "{out}", "--iterations", "0"),
    row("toy_demo", "eps must be >= 0, got -1.0", "--out", "{out}", "--eps", "-1"),
    row("toy_demo", "threads must be >= 1, got 0", "--out", "{out}", "--threads", "0"),
    row("toy_demo", "argument --iterations: invalid int value: 'many'", "--out", "{out}", "--iterations", "many"),
    # readouts of trained runs: run directories, class counts of classifier and score net, σ
    row("alignment", "give at least one run directory", "--out", "{out}"),
    row("alignment", "checkpoint not found", "{in}/missing-run", "--out", "{out}"),
    row("alignment", "is empty", "{in}/empty-run", "--out", "{out}"),
    row("alignment", "holds a score net for 3 classes, expected 10", "{in}/classifier-digits.safetensors", "--scorenet",
        "{in}/sn-3class-8x8", "--out", "{out}"),
    row("alignment", "anchor_smoothing must be in (0, 1)", "{in}/run-config-only", "--anchor-smoothing", "0",
        "--out", "{out}"),
    row("alignment", "--posterior-ensemble adds posterior nets, but posterior=empirical", "{in}/run-config-only",
        "--posterior", "empirical", "--posterior-ensemble", "{in}/pn-10class-8x8", "--out", "{out}"),
    row("smoothing", "noise_std σ must be a positive finite number", "{in}/classifier-digits.safetensors",
        "--scorenet", "{in}/sn-3class-8x8", "--sigmas", "0.1", "0", "--out", "{out}"),
    row("smoothing", "give at least one noise std", "{in}/run-config-only", "--sigmas", "--out", "{out}"),
    row("smoothing", "is not a training run directory: config.json is missing", "{in}/npz", "--out", "{out}"),
    row("dynamics", "has no per-epoch snapshots", "{in}/run-config-only", "--out", "{out}"),
    row("dynamics", "is empty", "{in}/empty-run", "--out", "{out}"),
    row("saliency", "give at least one run directory", "--out", "{out}"),
    row("saliency", "n_images must be >= 1, got 0", "{in}/run-config-only", "--n-images", "0", "--out", "{out}"),
    row("report", "has no results.json", "{in}/run-config-only", "--out", "{out}"),
    row("report", "a run directory is given twice", "{in}/run-config-only", "{in}/run-config-only", "--out", "{out}"),
    row("report", "run directory not found", "{in}/missing-run", "--out", "{out}"),
    row("report", "is empty", "{in}/empty-run", "--out", "{out}"),
    row("report", "give at least one run directory", "--out", "{out}"),
]


# -- the prepared inputs --------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``Path.touch(marker)``: the proof that a loader executed the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def images(n: int, side: int = 8, dtype=np.uint8) -> np.ndarray:
    return np.zeros((n, side, side, 1), dtype)


def save_classifier(path: Path, dataset: str, num_classes: int, shape: tuple[int, int, int]) -> None:
    model = build_classifier("mlp", dataset, num_classes, shape)
    info = {"model": "mlp", "dataset": dataset, "num_classes": num_classes, "image_shape": list(shape), "eps": 0.1}
    save_weights(path, model.state_dict(), {WEIGHTS_METADATA_KEY: json.dumps(info)})


def save_scorenet(path: Path, num_classes: int, shape: tuple[int, int, int]) -> Path:
    net = ScoreNet.build("tiny8", num_classes, shape, block_out_channels=(8, 16), norm_num_groups=8)
    return net.save_pretrained(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    labels = np.arange(4) % 3
    (root / "npz").mkdir()
    (root / "npz" / "corrupt.npz").write_bytes(b"not a zip archive")
    save_npz(root / "npz" / "no-label.npz", image=images(4))
    save_npz(root / "npz" / "no-image.npz", images=images(4), label=labels)
    save_npz(root / "npz" / "int32-images.npz", image=images(4, dtype=np.int32), label=labels)
    save_npz(root / "npz" / "3d-images.npz", image=np.zeros((4, 8, 8), np.uint8), label=labels)
    save_npz(root / "npz" / "range.npz", image=images(4, dtype=np.float32) + 2, label=labels)
    save_npz(root / "npz" / "float-labels.npz", image=images(4), label=labels.astype(np.float32))
    save_npz(root / "npz" / "negative-label.npz", image=images(4), label=np.array([0, 1, -1, 2]))
    for split, split_labels in (("train", labels), ("val", np.array([0, 1, 5, 2])), ("test", labels)):
        save_npz(root / "split" / f"data_{split}.npz", image=images(4), label=split_labels)  # val: label 5 of 3
    save_npz(root / "generated" / "labels-12" / "shard_00000.npz", image=images(4), label=np.array([0, 1, 12, 2]))
    save_npz(root / "generated" / "4x4" / "shard_00000.npz", image=images(4, side=4), label=labels)
    save_npz(root / "generated" / "digits" / "shard_00000.npz", image=images(20), label=np.arange(20) % 10)
    (root / "recipes").mkdir()
    (root / "recipes" / "unknown-key.json").write_text(json.dumps({"bogus_option": 1}))
    (root / "recipes" / "malformed.json").write_text('{"seed": 0,')
    (root / "recipes" / "old-steps.json").write_text(json.dumps({"steps": 3}))
    (root / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, not safetensors
    save_classifier(root / "classifier-digits.safetensors", "digits", 10, (1, 8, 8))
    save_classifier(root / "classifier-3class.safetensors", "gmm-4x4", 3, (1, 4, 4))
    torch.manual_seed(0)
    save_scorenet(root / "sn-3class-8x8", 3, (1, 8, 8))
    save_scorenet(root / "sn-10class-4x4", 10, (1, 4, 4))
    save_scorenet(root / "sn-10class-8x8", 10, (1, 8, 8))
    for name, classes, shape in (("pn-3class-8x8", 3, (1, 8, 8)), ("pn-10class-4x4", 10, (1, 4, 4)),
                                 ("pn-10class-8x8", 10, (1, 8, 8))):
        build_posterior_net("tiny8", classes, shape, 0.05, 0.5, block_out_channels=(8, 16), norm_num_groups=8
                            ).save_pretrained(root / name, safe_serialization=True)
    (root / "sn-corrupt").mkdir()
    (root / "empty-run").mkdir()
    (root / "run-config-only").mkdir()  # a run directory that never trained (no weights, snapshots or results)
    (root / "run-config-only" / "config.json").write_text(json.dumps({"config": {}, "run": {}}))
    (save_scorenet(root / "sn-bad-config", 3, (1, 8, 8)) / "scorenet_config.json").write_text("{")
    generate(GenerateConfig(scorenet=str(root / "sn-3class-8x8"), out=str(root / "generated-run"), num_images=3,
                            shard_size=3, sampler_steps=1, grid_columns=0))
    for step, damage in ((1, "pickle"), (2, "corrupt")):  # step checkpoint folders
        folder = root / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step}))
        torch.save({"model": Payload(root / "payload-ran")}, folder / "custom_checkpoint_0.pkl")
        write_manifest(folder)  # a consistent manifest: checksums alone cannot catch a planted pickle
        if damage == "corrupt":
            (folder / "meta.json").write_text(json.dumps({"step": 3}))
    return root


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


# -- running a row --------------------------------------------------------------------------------------------------
def resolve(argv, inputs: Path, out: Path) -> list[str]:
    return [arg.replace("{in}", str(inputs)).replace("{out}", str(out)) for arg in argv]


def run_in_process(entry: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run the entry point as its ``__main__`` would, with ``argv``; (exit status, stderr)."""
    target, _ = ENTRY_POINTS[entry]
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts prepend the repository
    monkeypatch.setattr(sys, "argv", [target, *argv])
    monkeypatch.delenv("TRAINLIB_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules ... prior to execution"
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    return exit_info.value.code, capsys.readouterr().err


def run_subprocess(entry: str, argv: list[str], cwd: Path) -> tuple[int, str]:
    target, _ = ENTRY_POINTS[entry]
    command = [str(ROOT / target)] if target.endswith(".py") else ["-m", target]
    env = {**os.environ, "TRAINLIB_DEBUG": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, *command, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stderr


def row_id(r: Row) -> str:
    words = "-".join(r.names.replace("'", "").split()[:4])
    return f"{r.entry}:{words}" + (":subprocess" if r.subprocess else "")


@pytest.mark.parametrize("case", ROWS, ids=row_id)
def test_bad_input_gives_one_error_line_and_writes_nothing(case, inputs, tmp_path, capsys, monkeypatch):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = snapshot(inputs)
    argv = resolve(case.argv, inputs, out)
    if case.subprocess:
        code, stderr = run_subprocess(case.entry, argv, cwd)
    else:
        code, stderr = run_in_process(case.entry, argv, capsys, monkeypatch)
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr, (code, stderr[-3000:])
    assert len(errors) == 1 and case.names in errors[0], lines
    assert lines == errors, f"other output on stderr: {lines}"
    assert not out.exists() and list(cwd.iterdir()) == [], "bad input left output files"
    assert snapshot(inputs) == before, "bad input changed the prepared inputs"
    assert not (inputs / "payload-ran").exists(), "a pickle payload was executed"


def test_every_command_has_rows_of_its_own():
    assert {r.entry for r in ROWS if r not in GENERIC} == set(ENTRY_POINTS)
    scripts = {str(p.relative_to(ROOT)) for p in (ROOT / "train").glob("*.py")}
    assert scripts <= {target for target, _ in ENTRY_POINTS.values()}, "a train/ script has no rows"
