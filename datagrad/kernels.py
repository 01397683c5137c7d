"""Gaussian kernel mixtures over a finite labelled set: exact posteriors of a training set and of its smoothing.

For N labelled centres (c_i, y_i) in d dimensions and a kernel std h > 0 (``bandwidth``),

    p(x, y) = (1/N) Σ_{i: y_i = y} N(x; c_i, h² I)          (class priors n_y/N)

    log p(y|x)     = LSE_{i: y_i = y}(−‖x − c_i‖²/2h²) − LSE_i(−‖x − c_i‖²/2h²)
    ∇_x log p(y|x) = (E_{i|x,y}[c_i] − E_{i|x}[c_i]) / h²,    weights w_i ∝ exp(−‖x − c_i‖²/2h²)
    ∇_x log p(x|y) = (E_{i|x,y}[c_i] − x) / h²               (the class score)

Adding Gaussian noise of std σ to x gives the same mixture with bandwidth sqrt(h² + σ²) (``at``). Two uses:

* the **exact smoothed posterior of a training set**, p_σ(y|x) ∝ Σ_{i: y_i = y} N(x; x_i, σ²I): the mixture with
  bandwidth σ (``KernelMixture(x_train, y_train, K, σ)``). It is the posterior of the training set convolved with
  N(0, σ²I), i.e. what denoising score matching on that set converges to at noise std σ, so it is the reference a
  score net or a posterior net fitted to the set is measured against;
* a data distribution with exact truth (``trainlib.datasets``' ``digits-mixture``: centres the real training digits,
  h ≈ 0.1), whose noisy posterior at any σ is exact.

Inputs may have any trailing shape that flattens to d. Cost: ‖x − c‖² = ‖x‖² − 2x·c + ‖c‖² is one matrix product per
class and chunk of ``chunk_size`` centres, so memory stays O(B · chunk_size) however large N is (CIFAR-10's 50,000
images fit a GPU); partial log-sum-exps and weighted means are merged exactly across chunks. ``log_posterior`` is
differentiable in x by autograd (``differentiable = True``); ``grad_log_posterior`` is the closed form above.
Computation runs in the input's dtype and device (a copy of the centres is kept per dtype and device).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class KernelMixture:
    """p(x, y) = (1/N) Σ_{i: y_i = y} N(x; c_i, h²I); implements ``datagrad.DataPosterior`` (module docstring)."""

    differentiable = True

    def __init__(self, centres: Tensor, labels: Tensor, num_classes: int, bandwidth: float, chunk_size: int = 4096):
        centres, labels = torch.as_tensor(centres), torch.as_tensor(labels)
        if centres.dim() < 2 or centres.shape[0] < 1 or not centres.dtype.is_floating_point:
            raise ValueError(f"centres must be a float tensor [N, ...] with N >= 1, got {tuple(centres.shape)}")
        if labels.shape != (centres.shape[0],) or labels.dtype.is_floating_point:
            raise ValueError(f"labels must be an integer tensor [N] = [{centres.shape[0]}], got {tuple(labels.shape)}")
        labels = labels.long()
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), found [{int(labels.min())}, {int(labels.max())}]")
        counts = torch.bincount(labels.cpu(), minlength=num_classes)
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"every class needs at least one centre; classes {empty} have none")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        order = torch.argsort(labels.cpu(), stable=True)
        self.event_shape = tuple(centres.shape[1:])
        self.num_classes, self.num_centres = int(num_classes), int(centres.shape[0])
        self.dim = math.prod(self.event_shape)
        self.centres = centres.detach().reshape(self.num_centres, self.dim)[order.to(centres.device)]  # by class
        self.labels = labels[order.to(labels.device)]
        self.bounds = [0, *torch.cumsum(counts, 0).tolist()]  # class k holds rows bounds[k]:bounds[k + 1]
        self.bandwidth = _check_bandwidth(bandwidth)
        self.chunk_size = int(chunk_size)
        self._copies: dict[tuple, tuple[Tensor, Tensor]] = {}

    def at(self, noise_std: float) -> KernelMixture:
        """The mixture of x + σn, n ~ N(0, I): the same centres with bandwidth sqrt(h² + σ²) (shares the centres)."""
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
        other = object.__new__(KernelMixture)
        other.__dict__.update(self.__dict__)
        other.bandwidth = math.sqrt(self.bandwidth**2 + noise_std**2)
        return other

    # -- the kernel sums ----------------------------------------------------------------------------------------------
    def _flatten(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"expected a batch [B, ...] whose trailing shape flattens to d = {self.dim}, "
                             f"got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.dim)

    def _centres_like(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(centres [N, d], squared norms [N]) in flat's dtype and device."""
        key = (flat.dtype, flat.device)
        if key not in self._copies:
            centres = self.centres.to(device=flat.device, dtype=flat.dtype)
            self._copies[key] = (centres, centres.pow(2).sum(dim=1))
        return self._copies[key]

    def class_sums(self, x: Tensor, with_means: bool = False, bandwidths: Tensor | None = None
                   ) -> tuple[Tensor, Tensor | None]:
        """L_y = LSE_{i: y_i = y}(−‖x − c_i‖²/2h²): [B, K]; with ``with_means`` also E_{i|x,y}[c_i]: [B, K, d].
        ``bandwidths`` [B] > 0: example b's own kernel std h_b instead of h."""
        flat = self._flatten(x)
        centres, norms = self._centres_like(flat)
        x_norms = flat.pow(2).sum(dim=1, keepdim=True)  # [B, 1]
        if bandwidths is None:
            scale = 1.0 / (2.0 * self.bandwidth**2)
        else:
            bandwidths = torch.as_tensor(bandwidths, device=flat.device, dtype=flat.dtype)
            if bandwidths.shape != (flat.shape[0],) or not bool((bandwidths > 0).all()):
                raise ValueError(f"bandwidths must be a [B] = [{flat.shape[0]}] tensor of kernel stds > 0, got "
                                 f"shape {tuple(bandwidths.shape)}")
            scale = (0.5 / bandwidths.pow(2)).unsqueeze(1)  # [B, 1]
        sums, means = [], []
        for k in range(self.num_classes):
            total, mean = None, None
            for start in range(self.bounds[k], self.bounds[k + 1], self.chunk_size):
                stop = min(start + self.chunk_size, self.bounds[k + 1])
                block = centres[start:stop]  # [n, d]
                sq_dist = (x_norms - 2.0 * flat @ block.T + norms[start:stop]).clamp_min(0.0)  # [B, n]
                logits = -scale * sq_dist
                part = logits.logsumexp(dim=1)  # [B]
                part_mean = logits.softmax(dim=1) @ block if with_means else None  # [B, d]
                if total is None:
                    total, mean = part, part_mean
                    continue
                merged = torch.logaddexp(total, part)
                if with_means:
                    mean = (mean * (total - merged).exp().unsqueeze(1)
                            + part_mean * (part - merged).exp().unsqueeze(1))
                total = merged
            sums.append(total)
            means.append(mean)
        return torch.stack(sums, dim=1), torch.stack(means, dim=1) if with_means else None

    # -- DataPosterior and densities (``noise_std`` σ > 0: those of x + σn, i.e. of ``at(σ)``) -----------------------
    def log_joint(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log p(x, y) = L_y − log N − (d/2)·log(2πh²): [B, K]."""
        if noise_std:
            return self.at(noise_std).log_joint(x)
        sums, _ = self.class_sums(x)
        return sums - math.log(self.num_centres) - 0.5 * self.dim * math.log(2 * math.pi * self.bandwidth**2)

    def log_marginal(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log p(x): [B]."""
        return self.log_joint(x, noise_std).logsumexp(dim=1)

    def log_posterior(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """log p(y|x): [B, K], differentiable in x by autograd."""
        if noise_std:
            return self.at(noise_std).log_posterior(x)
        sums, _ = self.class_sums(x)
        return sums.log_softmax(dim=1)

    def log_posterior_per_example(self, x: Tensor, bandwidths: Tensor) -> Tensor:
        """log p(y|x) of the same centres with kernel std ``bandwidths[b]`` for example b: [B, K]. With the training
        points as centres and bandwidths the noise stds σ_b, the exact smoothed training-set posterior p_σb(y|x_b)."""
        sums, _ = self.class_sums(x, bandwidths=bandwidths)
        return sums.log_softmax(dim=1)

    def grad_log_posterior(self, x: Tensor, noise_std: float = 0.0) -> Tensor:
        """∇_x log p(y|x) = (E_{i|x,y}[c_i] − E_{i|x}[c_i])/h² for every class: [B, K, *x.shape[1:]]."""
        if noise_std:
            return self.at(noise_std).grad_log_posterior(x)
        sums, means = self.class_sums(x, with_means=True)
        overall = torch.einsum("bk,bkd->bd", sums.softmax(dim=1), means)
        grad = (means - overall.unsqueeze(1)) / self.bandwidth**2
        return grad.reshape(x.shape[0], self.num_classes, *x.shape[1:])

    def score(self, x: Tensor, y: Tensor | None = None, noise_std: float = 0.0) -> Tensor:
        """∇_x log p(x|y) = (E_{i|x,y}[c_i] − x)/h² for labels y [B], or ∇_x log p(x) when y is None; x's shape."""
        if noise_std:
            return self.at(noise_std).score(x, y)
        flat = self._flatten(x)
        sums, means = self.class_sums(x, with_means=True)
        if y is None:
            mean = torch.einsum("bk,bkd->bd", sums.softmax(dim=1), means)
        else:
            y = torch.as_tensor(y, device=x.device).long()
            if y.shape != (x.shape[0],) or bool((y < 0).any()) or bool((y >= self.num_classes).any()):
                raise ValueError(f"labels must be a [B] tensor in [0, {self.num_classes})")
            mean = means[torch.arange(x.shape[0], device=x.device), y]
        return ((mean - flat) / self.bandwidth**2).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        """n pairs (x [n, *event_shape], y [n]): a uniformly drawn centre plus N(0, h²I), on the generator's device."""
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        device = generator.device if generator is not None else torch.device("cpu")
        rows = torch.randint(0, self.num_centres, (n,), generator=generator, device=device)
        noise = torch.randn(n, self.dim, generator=generator, device=device, dtype=torch.float64)
        x = self.centres.to(device=device, dtype=torch.float64)[rows] + self.bandwidth * noise
        return x.to(dtype).reshape(n, *self.event_shape), self.labels.to(device)[rows]


def _check_bandwidth(bandwidth: float) -> float:
    bandwidth = float(bandwidth)
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth (kernel std h) must be a positive finite number, got {bandwidth}")
    return bandwidth
