"""Offline quality report for generated images: class consistency and a Fréchet distance in a classifier's features.

    python -m trainlib.quality --generated runs/generated-digits --dataset digits

1. Reference classifier. A small classifier trained with cross-entropy on the REAL train split of ``--dataset``
   (``trainlib.models.build_model``; Adam, no augmentation), cached as ``<out>/classifier.safetensors`` and reused
   while its training settings are unchanged; or ``--classifier PATH`` (a ``train/train_classifier.py`` run directory
   or any ``.safetensors`` with trainlib metadata).
2. Class consistency = the classifier's accuracy on the generated images w.r.t. their intended labels (overall and
   per class). Reference: its accuracy on the real test split (what perfect generated data would score).
3. Fréchet distance between Gaussians fitted to the classifier's penultimate features (the input of its last
   linear layer) of the real test split (r) and of the generated images (g):

       FD = ||μ_r − μ_g||² + tr Σ_r + tr Σ_g − 2 tr (Σ_r^{1/2} Σ_g Σ_r^{1/2})^{1/2}

   (covariances with the 1/(n − 1) normalisation; matrix square roots by symmetric eigendecomposition in float64,
   negative round-off eigenvalues clipped to 0). Reference: FD(real test, real train), the value for generated data
   as good as held-out real data at these sample sizes (small samples bias FD upwards).

Writes ``<out>/quality.json`` (default ``<out>`` = ``<generated>/quality``) and prints a table.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import trange

from .checkpoint import save_weights
from .classifiers import WEIGHTS_METADATA_KEY, build_classifier, load_classifier
from .cli import checking_input, run_cli
from .config import config_to_dict, option, parse_config
from .datasets import ImageDataset, check_dataset_name, load_dataset
from .files import atomic_write_json, sha256_file
from .npz import load_generated
from .sampling import BatchLoader, ordered_batches

CLASSIFIER_FILE = "classifier.safetensors"
REPORT_FILE = "quality.json"


@dataclass
class QualityConfig:
    """Quality report of generated images: class consistency and Fréchet distance (trainlib.quality)."""

    generated: str = option("generated shards: a directory, a glob or one .npz", "runs/generated-digits")
    dataset: str = option("the real dataset the generator imitates (its train split trains the classifier)", "digits")
    data_dir: str = option("where CIFAR is downloaded to / read from", "data")
    classifier: str | None = option("a trained classifier (run directory or .safetensors); none: train one", None)
    model: str = option("classifier to train: a trainlib.models name, or auto (cnn-small up to 16x16, else "
                       "preact-resnet18)", "auto")
    epochs: int = option("epochs of cross-entropy training of the classifier", 30)
    batch_size: int = option("batch size of classifier training and feature extraction", 128)
    lr: float = option("Adam learning rate of classifier training", 1e-3)
    seed: int = option("seed of classifier initialisation and data order", 0)
    max_generated: int | None = option("use only the first N generated images (none: all)", None)
    out: str | None = option("output directory (none: <generated>/quality)", None)

    def validate(self) -> None:
        check_dataset_name(self.dataset)
        for name in ("epochs", "batch_size", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_generated is not None and self.max_generated < 1:
            raise ValueError(f"max_generated must be >= 1 or none, got {self.max_generated}")


# -- Fréchet distance ----------------------------------------------------------------------------------------------
def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root V diag(sqrt(max(λ, 0))) Vᵀ of a symmetric matrix (float64)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """FD between N(μ₁, Σ₁) and N(μ₂, Σ₂): ||μ₁ − μ₂||² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

    tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2} = Σ_i sqrt(λ_i) over the eigenvalues of that symmetric PSD product.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched shapes: means {mu1.shape}, {mu2.shape}; covariances {cov1.shape}, {cov2.shape}")
    root1 = sqrtm_psd(cov1)
    product = root1 @ cov2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (1/(n − 1)) of features [n, D] in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [n >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def features_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets [n, D] and [m, D]."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


# -- classifier outputs -------------------------------------------------------------------------------------------
def penultimate_layer(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of the model (its input = the penultimate features)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no linear layer whose input could serve as features")
    return linear[-1]


@torch.no_grad()
def predict(model: nn.Module, dataset: ImageDataset, batch_size: int, limit: int | None = None):
    """(predicted labels [n], intended labels [n], penultimate features [n, D]) for the first ``limit`` images."""
    device = next(model.parameters()).device
    captured: list[Tensor] = []
    hook = penultimate_layer(model).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].flatten(1)))
    predictions, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for x, y in ordered_batches(dataset, batch_size, device, limit):
            predictions.append(model(x).argmax(dim=1).cpu())
            labels.append(y.cpu())
    finally:
        hook.remove()
        model.train(was_training)
    features = torch.cat(captured).double().cpu().numpy()
    return torch.cat(predictions).numpy(), torch.cat(labels).numpy(), features


def class_consistency(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """Fraction of images classified as their intended label, overall and per class (NaN for an absent class)."""
    correct = predictions == labels
    per_class = [float(correct[labels == c].mean()) if (labels == c).any() else math.nan for c in range(num_classes)]
    return float(correct.mean()), per_class


# -- the reference classifier -------------------------------------------------------------------------------------
def load_reference(path: str | os.PathLike, device) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, info: its settings, the sha256 of its weights and their path)."""
    loaded = load_classifier(path)
    info = loaded.settings | {"sha256": loaded.sha256[:16], "path": str(loaded.weights)}
    return loaded.model.to(device), info


def default_model(image_shape: tuple[int, int, int]) -> str:
    """cnn-small for images up to 16×16, else preact-resnet18 (its 512-d features keep FD's covariance small)."""
    return "cnn-small" if image_shape[1] <= 16 else "preact-resnet18"


def train_classifier(
    train_set: ImageDataset, model_name: str, dataset: str, epochs: int, batch_size: int, lr: float, seed: int,
    device: torch.device | str,
) -> nn.Module:
    """Cross-entropy training with Adam on ``train_set`` (batches a pure function of the seed); eval mode."""
    torch.manual_seed(seed)
    model = build_classifier(model_name, dataset, train_set.num_classes, train_set.image_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = BatchLoader(train_set, min(batch_size, len(train_set)), seed=seed, device=device)
    model.train()
    for epoch in trange(epochs, desc=f"training {model_name} on {dataset}", leave=False):
        for x, y in loader.epoch(epoch):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def reference_classifier(cfg: QualityConfig, train_set: ImageDataset, out: Path, device) -> tuple[nn.Module, dict]:
    """``cfg.classifier`` if given; else the cached ``<out>/classifier.safetensors`` if trained with these settings,
    else a freshly trained one (then cached)."""
    if cfg.classifier is not None:
        return load_reference(cfg.classifier, device)
    model_name = default_model(train_set.image_shape) if cfg.model == "auto" else cfg.model
    training = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
                "train_examples": len(train_set)}
    cached = out / CLASSIFIER_FILE
    if cached.is_file():
        try:
            model, info = load_reference(cached, device)
            if (info.get("training"), info["model"], info["dataset"]) == (training, model_name, cfg.dataset):
                return model, info
        except ValueError:
            pass  # unreadable cache: train again and overwrite it
    model = train_classifier(train_set, model_name, cfg.dataset, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, device)
    info = {"model": model_name, "dataset": cfg.dataset, "num_classes": train_set.num_classes,
            "image_shape": list(train_set.image_shape), "training": training}
    out.mkdir(parents=True, exist_ok=True)
    save_weights(cached, model.state_dict(), {WEIGHTS_METADATA_KEY: json.dumps(info)})
    return model, dict(info, sha256=sha256_file(cached)[:16], path=str(cached))


# -- the report ----------------------------------------------------------------------------------------------------
def default_out(generated: str) -> Path:
    location = Path(generated)
    return (location if location.is_dir() else location.parent) / "quality"


def quality_report(cfg: QualityConfig) -> dict:
    """Class consistency and Fréchet distance of ``cfg.generated`` (module docstring); writes quality.json."""
    with checking_input():  # bad input fails here, before anything is written
        cfg.validate()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        train_set = load_dataset(cfg.dataset, "train", cfg.data_dir)
        test_set = load_dataset(cfg.dataset, "test", cfg.data_dir, train_set.num_classes)
        generated = load_generated(cfg.generated, train_set.num_classes)  # checks keys, dtypes, label range
        if generated.image_shape != train_set.image_shape:
            raise ValueError(f"generated images are {generated.image_shape} (C, H, W), {cfg.dataset} images are "
                             f"{train_set.image_shape}")
        out = Path(cfg.out) if cfg.out is not None else default_out(cfg.generated)
        classifier, info = reference_classifier(cfg, train_set, out, device)
        if info["num_classes"] != train_set.num_classes or tuple(info["image_shape"]) != train_set.image_shape:
            raise ValueError(f"classifier {info['path']} is for {info['num_classes']} classes and images "
                             f"{tuple(info['image_shape'])}, {cfg.dataset} has {train_set.num_classes} classes and "
                             f"{train_set.image_shape}")

    gen_pred, gen_labels, gen_features = predict(classifier, generated, cfg.batch_size, cfg.max_generated)
    test_pred, test_labels, test_features = predict(classifier, test_set, cfg.batch_size)
    _, _, train_features = predict(classifier, train_set, cfg.batch_size)
    consistency, per_class = class_consistency(gen_pred, gen_labels, train_set.num_classes)
    test_accuracy, _ = class_consistency(test_pred, test_labels, train_set.num_classes)
    report = {
        "generated": cfg.generated,
        "n_generated": len(gen_labels),
        "dataset": cfg.dataset,
        "n_real_test": len(test_labels),
        "n_real_train": len(train_set),
        "classifier": {key: info.get(key) for key in ("path", "model", "sha256", "training")},
        "feature_dim": int(gen_features.shape[1]),
        "class_consistency": consistency,
        "class_consistency_per_class": per_class,
        "classifier_real_test_accuracy": test_accuracy,
        "chance": 1 / train_set.num_classes,
        "frechet_distance": features_frechet_distance(test_features, gen_features),
        "frechet_distance_real_train_vs_test": features_frechet_distance(test_features, train_features),
        "config": config_to_dict(cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / REPORT_FILE, report)
    print(format_report(report))
    print(f"wrote {out / REPORT_FILE}")
    return report


def format_report(report: dict) -> str:
    """The report as a small plain-text table."""
    rows = [
        ("generated images", f"{report['n_generated']}"),
        (f"class consistency ({report['classifier']['model']})", f"{report['class_consistency']:.4f}"),
        ("  reference: real test accuracy", f"{report['classifier_real_test_accuracy']:.4f}"),
        ("  chance", f"{report['chance']:.4f}"),
        (f"Fréchet distance ({report['feature_dim']}-d features)", f"{report['frechet_distance']:.4g}"),
        ("  reference: real train vs test", f"{report['frechet_distance_real_train_vs_test']:.4g}"),
        ("worst class consistency", f"{np.nanmin(report['class_consistency_per_class']):.4f} (class "
                                    f"{int(np.nanargmin(report['class_consistency_per_class']))})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> dict:
    return quality_report(parse_config(QualityConfig, argv, prog="python -m trainlib.quality"))


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
