"""Denoising score matching: the loss is built from the same ε as its input, labels drop to null, it trains."""

import pytest
import torch

from datagrad import GaussianMixture
from scorenets import NoiseSchedule, ScoreNet, dsm_loss, to_model_range


class OracleEps:
    """Knows the clean batch, so it recovers ε = (u_t − sqrt(ᾱ(t))·u)/sqrt(1 − ᾱ(t)) exactly; records inputs."""

    def __init__(self, x):
        self.u, self.schedule, self.seen = to_model_range(x), NoiseSchedule(), []

    def __call__(self, u_t, t, labels):
        self.seen.append((t, labels))
        alpha_bar = self.schedule.alpha_bar_at(t).to(u_t.dtype).view(-1, 1, 1, 1)  # same precision as dsm_loss
        return (u_t - alpha_bar.sqrt() * self.u) / (1 - alpha_bar).sqrt()


def test_oracle_gets_zero_loss_and_sees_continuous_t_and_dropped_labels():
    x = torch.rand(256, 1, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 5, (256,))
    oracle = OracleEps(x)
    loss = dsm_loss(oracle, x, labels, 5, label_dropout=0.25, generator=torch.Generator().manual_seed(0),
                    reduction="none")
    assert loss.shape == (256,) and float(loss.max()) < 1e-12
    t, seen = oracle.seen[0]
    assert float(t.min()) >= 0 and float(t.max()) <= 999 and bool((t != t.round()).all())
    dropped = seen == 5
    assert torch.equal(seen[~dropped], labels[~dropped]) and 0.15 < float(dropped.double().mean()) < 0.35
    dsm_loss(oracle, x, labels, 5, label_dropout=0.0)
    assert torch.equal(oracle.seen[-1][1], labels)


def test_zero_predictor_loss_is_the_noise_power():
    x = torch.rand(4096, 1, 2, 2, dtype=torch.float64)
    loss = dsm_loss(lambda u, t, y: torch.zeros_like(u), x, torch.zeros(4096).long(), 1,
                    generator=torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(1.0, abs=0.05)  # E ε² = 1


def test_bad_arguments_raise():
    x = torch.rand(2, 1, 4, 4)
    model = lambda u, t, y: u
    with pytest.raises(ValueError, match="labels"):
        dsm_loss(model, x, torch.tensor([0, 3]), 3)  # label K is the null class, not data
    with pytest.raises(ValueError, match="label_dropout"):
        dsm_loss(model, x, torch.tensor([0, 1]), 3, label_dropout=1.5)
    with pytest.raises(ValueError, match="reduction"):
        dsm_loss(model, x, torch.tensor([0, 1]), 3, reduction="sum")


def test_dsm_training_decreases_the_loss_on_a_tiny_preset():
    """30 Adam steps on Gaussian-mixture images: a fixed held-out evaluation (same t, ε, dropout) drops by > 30 %."""
    torch.manual_seed(0)
    mixture = GaussianMixture(
        0.5 + 0.2 * torch.randn(3, 64, dtype=torch.float64), [0.05, 0.08, 0.1], [1 / 3] * 3, event_shape=(1, 8, 8)
    )
    net = ScoreNet.build("tiny8", 3, (1, 8, 8), block_out_channels=(16, 32), norm_num_groups=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_eval, y_eval = mixture.sample(128, torch.Generator().manual_seed(1))

    def evaluate():
        with torch.no_grad():
            return float(dsm_loss(net, x_eval, y_eval, 3, generator=torch.Generator().manual_seed(2)))

    before = evaluate()
    data = torch.Generator().manual_seed(3)
    for _ in range(30):
        x, y = mixture.sample(64, data)
        loss = dsm_loss(net, x, y, 3, generator=data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)
