"""Advantages, keep masks and the clipped loss against hand-computed values."""

import math

import pytest
import torch

from rlvr.objectives import clipped_policy_loss, compute_advantages, ratio_stats

# 3 prompts x 2 rollouts: (correct, wrong), (correct, correct), (wrong, wrong)
CORRECT = torch.tensor([1, 0, 1, 1, 0, 0])


def test_psr_keeps_only_correct_with_plus_one():
    adv, keep = compute_advantages(CORRECT, "PSR")
    assert keep.tolist() == [True, False, True, True, False, False]
    assert adv.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_nsr_keeps_only_incorrect_with_minus_one():
    adv, keep = compute_advantages(CORRECT.bool(), "NSR")
    assert keep.tolist() == [False, True, False, False, True, True]
    assert adv.tolist() == [0.0, -1.0, 0.0, 0.0, -1.0, -1.0]


def test_w_reinforce_weights_correct_by_lambda():
    adv, keep = compute_advantages(CORRECT.float(), "W_REINFORCE", lam=0.1)
    assert keep.all()
    assert adv.tolist() == pytest.approx([0.1, -1.0, 0.1, 0.1, -1.0, -1.0])


def test_reinforce_is_w_reinforce_with_lambda_one():
    adv, keep = compute_advantages(CORRECT, "REINFORCE", lam=0.1)  # lam is ignored
    assert keep.all()
    assert adv.tolist() == [1.0, -1.0, 1.0, 1.0, -1.0, -1.0]


def test_grpo_group_normalised_with_unbiased_std():
    adv, keep = compute_advantages(CORRECT, "GRPO", group_size=2)
    # group (1, 0): mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (0.70711 + 1e-6)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert keep.all()
    assert adv.tolist() == pytest.approx([a, -a, 0.0, 0.0, 0.0, 0.0], abs=1e-6)
    # group of 4 with rewards (1, 0, 0, 0): mean 0.25, unbiased std = 0.5
    adv4, _ = compute_advantages(torch.tensor([1, 0, 0, 0]), "GRPO", group_size=4)
    assert adv4.tolist() == pytest.approx([0.75 / 0.500001, -0.25 / 0.500001,
                                           -0.25 / 0.500001, -0.25 / 0.500001], abs=1e-6)


def test_bad_objective_and_group_size_raise():
    with pytest.raises(ValueError, match="unknown objective"):
        compute_advantages(CORRECT, "PPO")
    with pytest.raises(ValueError, match="GRPO"):
        compute_advantages(CORRECT, "GRPO", group_size=4)  # 6 samples not divisible by 4


def test_loss_at_ratio_one_is_reinforce_token_mean():
    # two samples, lengths 2 and 3 (padded to 3); ratio 1 everywhere
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    loss = clipped_policy_loss(logp, logp.detach(), adv, mask, clip_range=0.2)
    # per token -A * 1: sample 0 -> -1, -1 ; sample 1 -> +1, +1, +1 ; sum = 1 over 5 tokens
    assert loss.item() == pytest.approx(1 / 5)


def test_loss_gradient_is_advantage_weighted_logprob_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([2.0, -1.0])
    clipped_policy_loss(logp, logp.detach(), adv, mask, 0.2).backward()
    # d/dlogp of -A * exp(logp - old) at logp = old is -A; token mean over 3 tokens
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


def test_clip_binds_for_positive_advantage_above_one_plus_eps():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9]]))  # ratios 1.5 (clipped to 1.2) and 0.9
    logp.requires_grad_(True)
    loss = clipped_policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2)
    # A>0: min(1.5, 1.2) = 1.2 ; min(0.9, 0.9) = 0.9 -> loss = -(1.2 + 0.9) / 2
    assert loss.item() == pytest.approx(-1.05)
    loss.backward()
    # the clipped token has no gradient; the other has d(-rho)/dlogp / 2 = -0.9 / 2
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.45])


def test_clip_binds_for_negative_advantage_below_one_minus_eps():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[0.5, 1.5]]))  # ratios 0.5 (-> 0.8) and 1.5 (unclipped side)
    logp.requires_grad_(True)
    loss = clipped_policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), 0.2)
    # A<0: -min(-0.5, -0.8) = 0.8 ; -min(-1.5, -1.2) = 1.5 -> loss = (0.8 + 1.5) / 2
    assert loss.item() == pytest.approx(1.15)
    loss.backward()
    # ratio 0.5 is clipped (no gradient); ratio 1.5 stays unclipped for A<0 (pessimistic bound)
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.75])


def test_normalizer_makes_micro_batches_sum_to_the_mini_batch_mean():
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    old = logp + 0.1 * torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.2])
    whole = clipped_policy_loss(logp, old, adv, mask, 0.2)
    n = mask.sum()
    parts = sum(clipped_policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2,
                                    normalizer=n) for i in (0, 2))
    assert parts.item() == pytest.approx(whole.item())
    # the mean of micro-batch means would differ (5+2 vs 1+3 tokens)
    mean_of_means = sum(clipped_policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2],
                                            mask[i:i + 2], 0.2) for i in (0, 2)) / 2
    assert mean_of_means.item() != pytest.approx(whole.item())


def test_ratio_stats_counts_tokens_outside_the_clip_range():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.3, 0.7, 1.1]]))
    s = ratio_stats(logp, old, torch.tensor([[1, 1, 1, 0]]), 0.2)
    assert s["n_tokens"] == 3 and s["n_clipped"] == 2
    assert s["ratio_max"] == pytest.approx(1.3) and s["ratio_min"] == pytest.approx(0.7)
