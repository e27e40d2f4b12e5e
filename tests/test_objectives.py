"""Advantages, keep masks and the clipped loss against hand-computed values."""

import math

import pytest
import torch

from rlvr.objectives import (
    compute_advantages,
    finish_mismatch_stats,
    kl_k3,
    minibatch_schedule,
    mismatch_stats,
    per_token_loss,
    ratio_stats,
    rollout_is_weights,
)

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


def token_mean_loss(logp, old_logp, adv, mask, clip_range):
    """per_token_loss's token mean over the masked tokens: one mini-batch in one micro-batch."""
    mask = mask.to(logp.dtype)
    return (per_token_loss(logp, old_logp, adv, clip_range) * mask).sum() / mask.sum()


def test_loss_at_ratio_one_is_reinforce_token_mean():
    # two samples, lengths 2 and 3 (padded to 3); ratio 1 everywhere
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    loss = token_mean_loss(logp, logp.detach(), adv, mask, clip_range=0.2)
    # per token -A * 1: sample 0 -> -1, -1 ; sample 1 -> +1, +1, +1 ; sum = 1 over 5 tokens
    assert loss.item() == pytest.approx(1 / 5)


def test_loss_gradient_is_advantage_weighted_logprob_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([2.0, -1.0])
    token_mean_loss(logp, logp.detach(), adv, mask, 0.2).backward()
    # d/dlogp of -A * exp(logp - old) at logp = old is -A; token mean over 3 tokens
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


def test_clip_binds_for_positive_advantage_above_one_plus_eps():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9]]))  # ratios 1.5 (clipped to 1.2) and 0.9
    logp.requires_grad_(True)
    loss = token_mean_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2)
    # A>0: min(1.5, 1.2) = 1.2 ; min(0.9, 0.9) = 0.9 -> loss = -(1.2 + 0.9) / 2
    assert loss.item() == pytest.approx(-1.05)
    loss.backward()
    # the clipped token has no gradient; the other has d(-rho)/dlogp / 2 = -0.9 / 2
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.45])


def test_clip_binds_for_negative_advantage_below_one_minus_eps():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[0.5, 1.5]]))  # ratios 0.5 (-> 0.8) and 1.5 (unclipped side)
    logp.requires_grad_(True)
    loss = token_mean_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), 0.2)
    # A<0: -min(-0.5, -0.8) = 0.8 ; -min(-1.5, -1.2) = 1.5 -> loss = (0.8 + 1.5) / 2
    assert loss.item() == pytest.approx(1.15)
    loss.backward()
    # ratio 0.5 is clipped (no gradient); ratio 1.5 stays unclipped for A<0 (pessimistic bound)
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.75])


def test_ratio_stats_counts_tokens_outside_the_clip_range():
    old = torch.zeros(1, 4)
    # the padding position's ratio is inf: it must not leak into the sums
    logp = torch.log(torch.tensor([[1.0, 1.3, 0.7, 1.0]]))
    logp[0, 3] = 1e4
    s = {k: v.item() for k, v in ratio_stats(logp, old, torch.tensor([[1, 1, 1, 0]]),
                                              0.2).items()}
    assert s["n_tokens"] == 3 and s["n_clipped"] == 2 and s["ratio_sum"] == pytest.approx(3.0)
    assert s["ratio_max"] == pytest.approx(1.3) and s["ratio_min"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- mini-batches


def test_paper_schedule_subsets_then_splits_with_kept_over_mini_weights():
    # 64 samples, 3 kept (PSR at ~5% accuracy), mini-batches of 16: the paper's code takes ONE
    # optimizer step on the 3 kept samples, its token mean weighted by 3/16
    keep = [i in (5, 17, 40) for i in range(64)]
    lengths = [10] * 64
    sched = minibatch_schedule(keep, lengths, 16, "paper", list(range(64)))
    assert [m.indices for m in sched] == [[5, 17, 40]]
    # loss = (3/16) * sum / 30 tokens  <=>  sum / (30 * 16/3)
    assert sched[0].normalizer == pytest.approx(30 * 16 / 3)


def test_paper_schedule_gives_ceil_kept_over_mini_steps_and_a_short_last_step():
    keep = [i % 3 == 0 for i in range(60)]  # 20 kept
    lengths = [i % 7 + 1 for i in range(60)]
    order = list(range(60))
    sched = minibatch_schedule(keep, lengths, 16, "paper", order)
    kept = [i for i in order if keep[i]]
    assert [m.indices for m in sched] == [kept[:16], kept[16:]]
    assert sched[0].normalizer == pytest.approx(sum(lengths[i] for i in kept[:16]))  # weight 1
    assert sched[1].normalizer == pytest.approx(sum(lengths[i] for i in kept[16:]) * 16 / 4)


def test_batch_token_mean_splits_first_and_counts_dropped_tokens():
    keep = [True, False, False, True, False, False]
    lengths = [2, 3, 4, 5, 6, 7]
    sched = minibatch_schedule(keep, lengths, 3, "batch_token_mean", [0, 1, 2, 3, 4, 5])
    assert [(m.indices, m.normalizer) for m in sched] == [([0], 9.0), ([3], 18.0)]
    # a mini-batch whose samples were all dropped is no optimizer step at all
    none_kept = minibatch_schedule([False, False, True, False], [1, 1, 1, 1], 2,
                                   "batch_token_mean", [0, 1, 2, 3])
    assert [m.indices for m in none_kept] == [[2]]


def _summed_loss(logp, adv, keep, lengths, loss_agg, mini):
    mask = torch.zeros_like(logp)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    total = logp.new_zeros(())
    for mb in minibatch_schedule(keep.tolist(), lengths, mini, loss_agg, list(range(len(keep)))):
        tok = per_token_loss(logp[mb.indices], logp[mb.indices].detach(), adv[mb.indices], 0.2)
        total = total + (tok * mask[mb.indices]).sum() / mb.normalizer
    return total


@pytest.mark.parametrize("mini", [8, 3])
def test_batch_token_mean_decomposes_reinforce_into_psr_plus_nsr(mini):
    """grad PSR + grad NSR == grad REINFORCE (lambda = 1) on the same batch: the identity the
    paper is named after, exact under batch_token_mean (not under the paper's normaliser)."""
    torch.manual_seed(0)
    correct = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0])
    lengths = [3, 5, 2, 4, 6, 1, 5, 3]
    base = torch.randn(8, 6)

    def grads(loss_agg: str) -> dict[str, torch.Tensor]:
        out = {}
        for obj in ("PSR", "NSR", "REINFORCE"):
            logp = base.clone().requires_grad_(True)
            adv, keep = compute_advantages(correct, obj)
            _summed_loss(logp, adv, keep, lengths, loss_agg, mini).backward()
            out[obj] = logp.grad
        return out

    exact = grads("batch_token_mean")
    torch.testing.assert_close(exact["PSR"] + exact["NSR"], exact["REINFORCE"], rtol=0,
                               atol=1e-7)
    # the paper's normaliser rescales each objective by its own kept share: no identity
    paper = grads("paper")
    assert not torch.allclose(paper["PSR"] + paper["NSR"], paper["REINFORCE"], atol=1e-4)


# ----------------------------------------------------------------------------- KL, entropy, IS


def test_k3_kl_is_hand_computed_and_unbiased_for_the_full_kl():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    d = -0.5
    assert kl_k3(logp, ref).item() == pytest.approx(math.exp(d) - d - 1)
    # E_{y ~ pi}[k3(y)] = KL(pi || pi_ref) exactly, over a whole small vocabulary
    torch.manual_seed(1)
    lp = torch.log_softmax(torch.randn(7), -1)
    lr = torch.log_softmax(torch.randn(7), -1)
    expected = (lp.exp() * (lp - lr)).sum()
    assert (lp.exp() * kl_k3(lp, lr)).sum().item() == pytest.approx(expected.item(), rel=1e-5)
    # the gradient w.r.t. logp is 1 - exp(ref - logp)
    x = torch.tensor([-1.0], requires_grad=True)
    kl_k3(x, ref).backward()
    assert x.grad.item() == pytest.approx(1 - math.exp(d))


def test_kl_and_entropy_terms_enter_the_per_token_loss():
    logp = torch.tensor([[-1.0, -2.0]])
    old = logp.clone()
    ent = torch.tensor([[0.5, 0.25]])
    ref = torch.tensor([[-1.5, -2.0]])
    base = per_token_loss(logp, old, torch.tensor([1.0]), 0.2)
    assert base.tolist() == [[-1.0, -1.0]]
    both = per_token_loss(logp, old, torch.tensor([1.0]), 0.2, entropy=ent, entropy_coef=0.1,
                          ref_logp=ref, kl_coef=0.01)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert both.tolist()[0] == pytest.approx([-1.0 - 0.05 + 0.01 * k3, -1.0 - 0.025])


def test_truncated_is_weights_are_token_ratios_capped():
    old = torch.tensor([[-1.0, -1.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.0, -1.5, -0.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = rollout_is_weights(old, sampler, mask, "tis", 1.5)
    # ratios e^0 = 1, e^0.5 = 1.65 -> capped 1.5, e^-0.8 = 0.449; padding 1
    assert w.tolist()[0] == pytest.approx([1.0, 1.5, math.exp(-0.8), 1.0], rel=1e-6)


def test_masked_is_weights_are_sequence_ratios_and_mask_sequences_over_the_cap():
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    sampler = torch.tensor([[-1.2, -1.1], [-1.5, -1.6]])
    mask = torch.ones(2, 2)
    w = rollout_is_weights(old, sampler, mask, "mis", 2.0)
    # sequence 0: e^(0.2 + 0.1) = 1.35 on every token; sequence 1: e^1.1 = 3.0 > 2 -> masked
    assert w[0].tolist() == pytest.approx([math.exp(0.3)] * 2, rel=1e-6)
    assert w[1].tolist() == [0.0, 0.0]
    stats = finish_mismatch_stats([mismatch_stats(old, sampler, mask, w)])
    assert stats["train/logp_gap_max"] == pytest.approx(0.6, rel=1e-6)
    assert stats["train/is_masked_frac"] == 0.5


def test_ratio_stats_without_response_tokens_give_no_extremes():
    # no masked token, or no position at all: nothing counted, and extremes that any real ratio
    # replaces (the step reports 1.0 when it saw no token)
    for shape in ((2, 3), (2, 0)):
        s = {k: v.item() for k, v in ratio_stats(torch.zeros(shape), torch.zeros(shape),
                                                  torch.zeros(shape), 0.2).items()}
        assert s["n_tokens"] == s["n_clipped"] == s["ratio_sum"] == 0.0
        assert s["ratio_max"] == -math.inf and s["ratio_min"] == math.inf
