"""Saliency: input gradients of several classifiers next to the data gradient, for the same test images.

    python -m analysis.saliency runs/digits-standard runs/digits-pgd-at runs/digits-trades-se \\
        runs/digits-direct-score --scorenet runs/scorenet-digits --out runs/analysis

For the first ``--n-images`` test images x with labels y: the model gradient ∇_x log p_θ(y|x) of each run (final EMA
weights) and the data gradient ∇_x log p_d(y|x) (``analysis.sources``: exact for gmm-* toys; for images the score
net's centred estimate at the clean point, G̃_y = s_y − Σ_k p̂_k s_k with the smoothed anchor p̂, i.e. the direction
s_y − mean_{k≠y} s_k, as direct SCORE training sees it). Colour images (CIFAR) are summed over channels. Each map is
scaled to its own max |value| on a diverging colormap symmetric around 0 (red: increasing the pixel raises
log p(y|x)), since the magnitudes differ by orders between models; the panel titles give the cosine between the
model and the data gradient (flattened over pixels and channels).

Writes ``<out>/saliency.png`` (one row per image: the image, the data gradient, one column per run) and
``<out>/saliency.json`` (per image and run: the cosine and the gradient's ℓ2 norm).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from trainlib.cli import run_cli
from trainlib.config import option, parse_config
from trainlib.files import atomic_write_json

from . import sources


@dataclass
class SaliencyConfig(sources.PosteriorOptions):
    """Input gradients of classifiers next to the data gradient for the same test images."""

    which: Literal["final", "best"] = option("the run's final EMA weights or best/ (by validation)", "final")
    n_images: int = option("first n test images (one figure row each)", 6)
    out: str = option("output directory", "runs/analysis")

    def validate(self) -> None:
        super().validate()
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")


def model_gradient(model, x: Tensor, y: Tensor) -> Tensor:
    """∇_x log p_θ(y|x): same shape as x."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        log_p = model(x).log_softmax(dim=1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, x)
    return grad


def cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def compute(cfg: SaliencyConfig) -> dict:
    """Images, labels, the data gradient and every run's model gradient (numpy, channels summed) with cosines."""
    opened = sources.open_all(cfg, cfg.which, torch.float64)
    classifiers = [classifier for classifier, _ in opened]
    first, data = opened[0]
    x, y = sources.test_points(first.test, cfg.n_images, torch.float64)
    rows = torch.arange(len(y), device=x.device)
    with torch.no_grad():
        data_grad = data.posterior(x, y).grad_log_posterior(x)[rows, y].to(x.dtype)  # [n, C, H, W]
    columns = {}
    for classifier in classifiers:
        data.check(classifier)
        if classifier.test.name != first.test.name:
            raise ValueError(f"all runs must use the same data: {classifier.source} is on {classifier.test.name}, "
                             f"{first.source} on {first.test.name}")
        grad = model_gradient(classifier.model, x, y)
        columns[classifier.name] = {"grad": grad, "cosine": cosine(grad, data_grad), "objective":
                                    classifier.settings.get("objective")}
    as_map = lambda g: g.sum(dim=1).cpu().numpy()  # [n, H, W]
    models = {
        name: {**c, "grad": as_map(c["grad"]), "norm": c["grad"].flatten(1).norm(dim=1).tolist(),
               "cosine": c["cosine"].tolist()}
        for name, c in columns.items()
    }
    return {"images": x.permute(0, 2, 3, 1).cpu().numpy(), "labels": y.tolist(), "data": as_map(data_grad),
            "data_description": data.description, "models": models}


def plot_saliency(path: Path, result: dict) -> Path:
    """One row per image: the image, the data gradient, one column per model (each map scaled to its max |value|)."""
    from .plotting import plt, save_figure, style

    names = list(result["models"])
    n, columns = len(result["labels"]), 2 + len(names)
    with style():
        figure, axes = plt.subplots(n, columns, figsize=(1.7 * columns + 0.8, 1.8 * n + 0.6), squeeze=False,
                                    layout="constrained")
        image = None
        for row in range(n):
            picture = result["images"][row]
            axes[row, 0].imshow(picture[..., 0] if picture.shape[-1] == 1 else picture.clip(0, 1), cmap="gray",
                                vmin=0, vmax=1)
            axes[row, 0].set_title(f"image (y = {result['labels'][row]})", fontsize=8)
            maps = [("data gradient", result["data"][row])]
            maps += [(f"{name}\ncos {result['models'][name]['cosine'][row]:+.2f}", result["models"][name]["grad"][row])
                     for name in names]
            for column, (title, values) in enumerate(maps, start=1):
                scale = float(np.abs(values).max()) or 1.0
                image = axes[row, column].imshow(values / scale, cmap="RdBu_r", vmin=-1, vmax=1)
                axes[row, column].set_title(title, fontsize=8)
        for a in axes.flat:
            a.set_xticks([])
            a.set_yticks([])
            a.grid(False)
        colorbar = figure.colorbar(image, ax=axes[:, 1:], shrink=0.6, location="right")
        colorbar.set_label("∇_x log p(y|x) / max|·| (relative, unitless)")
        figure.suptitle("input gradients ∇_x log p_θ(y|x) of each model vs the data gradient ∇_x log p_d(y|x)",
                        fontsize=10)
        return save_figure(figure, path)


def run_saliency(cfg: SaliencyConfig) -> dict:
    result = compute(cfg)
    out = Path(cfg.out)
    figure = plot_saliency(out / "saliency.png", result)
    record = {"labels": result["labels"], "data_gradient": result["data_description"],
              "models": {name: {"objective": m["objective"], "cosine": m["cosine"], "grad_l2_norm": m["norm"]}
                         for name, m in result["models"].items()}}
    atomic_write_json(out / "saliency.json", record)
    return record | {"figure": str(figure)}


def main(argv: list[str] | None = None) -> dict:
    record = run_saliency(parse_config(SaliencyConfig, argv, prog="python -m analysis.saliency"))
    for name, m in record["models"].items():
        print(f"{name}: mean cosine with the data gradient {np.mean(m['cosine']):+.3f}")
    print(f"wrote {record['figure']}")
    return record


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
