"""Advantages and KL estimators against values worked out by hand (rl/advantages.py, rl/kl.py)."""
import math

import pytest
import torch

from posttrain.rl.advantages import gae, group_advantages, masked_mean, whiten
from posttrain.rl.kl import KL_ESTIMATORS, exact_kl, kl_k1, kl_k2, kl_k3


def test_gae_on_a_three_step_episode():
    """r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma 0.9, lambda 0.8, V after the end = 0:

    delta_2 = 1 - 0.7 = 0.3               A_2 = 0.3
    delta_1 = 0.9 * 0.7 - 0.6 = 0.03      A_1 = 0.03 + 0.72 * 0.3   = 0.246
    delta_0 = 0.9 * 0.6 - 0.5 = 0.04      A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    returns = A + V = (0.71712, 0.846, 1.0)
    The row also has a prompt position before and a padding position after (mask 0, junk values),
    which must not leak into the episode.
    """
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, torch.tensor([[0.0, 0.21712, 0.246, 0.3, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.0, 0.71712, 0.846, 1.0, 0.0]]), atol=1e-6)


def test_gae_with_lambda_one_is_the_return_minus_the_value():
    rewards = torch.tensor([[0.2, -0.1, 1.0]])
    values = torch.tensor([[0.3, 0.1, 0.4]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[1.1, 0.9, 1.0]]), atol=1e-6)  # reward-to-go
    assert torch.allclose(advantages, returns - values, atol=1e-6)


def test_whitening_ignores_masked_positions():
    """Masked values 1, 2, 3: mean 2, population variance 2/3, so (x - 2) / sqrt(2/3) = -1.2247, 0, 1.2247."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert torch.allclose(whiten(x, mask), torch.tensor([[-1.224744, 0.0, 1.224744, 0.0]]), atol=1e-5)
    assert masked_mean(x, mask).item() == pytest.approx(2.0)


def test_group_normalised_advantages_with_and_without_std():
    """Group 1 rewards (1, 0, 0, 0): mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5,
    so A = (1.5, -0.5, -0.5, -0.5) (up to eps). Group 2 is all right: no signal, A = 0.
    Dr. GRPO keeps the centred rewards: (0.75, -0.25, -0.25, -0.25)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    scaled = group_advantages(rewards, group_size=4)
    assert torch.allclose(scaled, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-3)
    unscaled = group_advantages(rewards, group_size=4, scale=False)
    assert torch.allclose(unscaled, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_kl_estimators_on_one_token():
    """pi(y) = 0.5, ref(y) = 0.25, so r = log(ref/pi) = -log 2:
    k1 = log 2 = 0.6931, k2 = (log 2)^2 / 2 = 0.2402, k3 = e^r - 1 - r = 0.5 - 1 + log 2 = 0.1931."""
    logp, ref_logp = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    assert kl_k1(logp, ref_logp).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref_logp).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(logp, ref_logp).item() == pytest.approx(math.log(2) - 0.5)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k3_is_unbiased_and_matches_the_exact_kl():
    """E_pi[k3] = KL(pi || ref) exactly, because E_pi[ref/pi] = 1; the exact KL sums over the vocabulary.
    pi = (0.5, 0.5), ref = (0.25, 0.75): KL = 0.5 log 2 + 0.5 log(2/3) = 0.1438."""
    pi, ref = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    expected_k3 = (pi * kl_k3(pi.log(), ref.log())).sum()
    exact = exact_kl(pi.log().view(1, 1, 2), ref.log().view(1, 1, 2))
    assert exact.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert expected_k3.item() == pytest.approx(exact.item(), abs=1e-6)
    assert (pi * kl_k3(pi.log(), ref.log())).min() >= 0  # every k3 term is non-negative, unlike k1
