"""The training objectives of the reward models (the formulas of rewards/training.py's
docstring): REINFORCE with a learned value baseline, its agreement reward, the pairwise
ranking loss and the regression baseline.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rewards.towers import PolicyOutput

log = logging.getLogger(__name__)


#: Sampled scores are kept this far from 0 and 1 (the Beta log-density is finite there).
SCORE_EPS = 1e-6
# --------------------------------------------------------------------------- losses


def agreement_reward(
    score: torch.Tensor, target: torch.Tensor, kind: str = "absolute"
) -> torch.Tensor:
    """Reward of sampled scores against the rating: 1 - |s - y| or 1 - (s - y)^2, in [0, 1]."""
    if kind == "absolute":
        return 1.0 - (score - target).abs()
    if kind == "squared":
        return 1.0 - (score - target) ** 2
    raise ValueError(f"unknown reward {kind!r}; allowed: 'absolute', 'squared'")


def policy_gradient_loss(
    dist: torch.distributions.Distribution, sample: torch.Tensor, advantage: torch.Tensor
) -> torch.Tensor:
    """REINFORCE surrogate -mean(A.detach() * log pi(s)): its gradient is the estimator."""
    return -(advantage.detach() * dist.log_prob(sample)).mean()


def reinforce_loss(
    out: PolicyOutput,
    target: torch.Tensor,
    *,
    num_samples: int = 4,
    entropy_coef: float = 1e-3,
    value_coef: float = 0.5,
    reward: str = "absolute",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy gradient with the learned value baseline, entropy bonus and value loss.

    ``out`` holds (B,) alpha, beta and value; ``target`` (B,) ratings in [0, 1].
    Returns the loss and its parts (floats) for logging.
    """
    dist = out.distribution()
    with torch.no_grad():
        sample = dist.sample((num_samples,)).clamp(SCORE_EPS, 1.0 - SCORE_EPS)  # (K, B)
        r = agreement_reward(sample, target.expand_as(sample), reward)
    value = out.value.unsqueeze(0).expand_as(r)  # V(x) does not depend on the sample
    advantage = r - value.detach()
    pg = policy_gradient_loss(dist, sample, advantage)
    entropy = dist.entropy().mean()
    value_loss = F.mse_loss(value, r)
    loss = pg - entropy_coef * entropy + value_coef * value_loss
    return loss, {
        "loss": float(loss.detach()),
        "reward": float(r.mean()),
        "advantage_std": float(advantage.std()) if advantage.numel() > 1 else 0.0,
        "entropy": float(entropy.detach()),
        "value_loss": float(value_loss.detach()),
    }


def ranking_loss(
    out: PolicyOutput, target: torch.Tensor, pair_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE of the mean score against the rating plus a pairwise ranking loss.

    For every two pairs of the batch with different ratings y_i > y_j the logistic loss
    softplus(-(l_i - l_j)) of the score logits l = log(alpha / beta) (the logit of the
    mean) pushes the better-rated pair's score above the other's; the BCE term keeps the
    scores on the rating scale.
    """
    mean = out.mean.clamp(SCORE_EPS, 1 - SCORE_EPS)
    bce = F.binary_cross_entropy(mean, target)
    logit = out.alpha.log() - out.beta.log()
    better = (target[:, None] - target[None, :]) > 1e-6  # (i, j): y_i > y_j
    if better.any():
        diff = logit[:, None] - logit[None, :]
        rank = F.softplus(-diff[better]).mean()
    else:
        rank = logit.sum() * 0.0
    loss = bce + pair_weight * rank
    return loss, {"loss": float(loss.detach()), "bce": float(bce.detach()),
                  "rank": float(rank.detach())}  # fmt: skip


def regression_loss(
    out: PolicyOutput, target: torch.Tensor, kind: str = "mse"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised baseline: MSE (or BCE) between the mean score and the rating."""
    mean = out.mean
    if kind == "mse":
        loss = F.mse_loss(mean, target)
    elif kind == "bce":
        loss = F.binary_cross_entropy(mean.clamp(SCORE_EPS, 1 - SCORE_EPS), target)
    else:
        raise ValueError(f"unknown regression loss {kind!r}; allowed: 'mse', 'bce'")
    return loss, {"loss": float(loss.detach())}
