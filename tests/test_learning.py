"""Sign and plumbing of the update: PSR raises, NSR lowers the log-prob of its samples; tiny
learning rates are not rounded away; several mini-batches make the clip act."""

import pytest
import torch

from rlvr import training
from rlvr.logprobs import PolicyLogprobs, collate, token_logprobs
from rlvr.modeling import load_policy
from rlvr.objectives import compute_advantages, minibatch_schedule, per_token_loss, ratio_stats
from rlvr.optimizers import make_optimizer
from rlvr.training import UpdateBatch, UpdateSettings, policy_update

CPU = torch.device("cpu")
PAD = 257
# Fixed, teacher-forced rollouts: two prompts x two responses; sample 0 and 2 are "correct".
PROMPTS = [[258, 10, 11, 12, 13], [258, 10, 11, 12, 13], [258, 20, 21, 22], [258, 20, 21, 22]]
RESPONSES = [[30, 31, 32, 256], [40, 41, 42, 43, 256], [50, 51, 256], [60, 61, 62, 256]]
CORRECT = torch.tensor([1.0, 0.0, 1.0, 0.0])


def sequence_logprobs(model) -> torch.Tensor:
    b = collate(PROMPTS, RESPONSES, PAD, CPU)
    with torch.no_grad():
        logp, _ = token_logprobs(model, b, 1.0)
    return logp.sum(-1)


def settings(mini_batch_size: int = 4, micro_batch_tokens: int | None = 20,
             **kw) -> UpdateSettings:
    """20 padded tokens: two samples per micro-batch (sequences of 7-10 tokens)."""
    return UpdateSettings(temperature=1.0, clip_range=kw.pop("clip_range", 0.2),
                          mini_batch_size=mini_batch_size, max_grad_norm=1.0, pad_id=PAD,
                          device=CPU, micro_batch_tokens=micro_batch_tokens, **kw)


def train(model, objective: str, lr: float, steps: int, mini_batch_size: int = 4,
          clip_range: float = 0.2) -> list[dict]:
    opt = make_optimizer(model, lr=lr, weight_decay=0.0)
    adv, keep = compute_advantages(CORRECT, objective, lam=0.1, group_size=2)
    batch = UpdateBatch(PROMPTS, RESPONSES, adv, keep)
    gen = torch.Generator().manual_seed(0)
    s = settings(mini_batch_size, clip_range=clip_range)
    return [policy_update(PolicyLogprobs(model), opt, batch, s, gen) for _ in range(steps)]


@pytest.fixture
def model(tiny_model_dir):
    return load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=True)


def test_psr_raises_the_logprob_of_rewarded_responses(model):
    before = sequence_logprobs(model)
    stats = train(model, "PSR", lr=1e-2, steps=5)
    after = sequence_logprobs(model)
    assert all(s["n_updates"] == 1 for s in stats)
    assert (after[[0, 2]] - before[[0, 2]] > 1.0).all(), (before, after)


def test_nsr_lowers_the_logprob_of_penalised_responses(model):
    before = sequence_logprobs(model)
    train(model, "NSR", lr=1e-2, steps=5)
    after = sequence_logprobs(model)
    assert (after[[1, 3]] - before[[1, 3]] < -1.0).all(), (before, after)


def test_updates_at_lr_1e_6_are_not_rounded_away(model):
    w = model.model.layers[0].mlp.down_proj.weight
    before = w.detach().clone()
    train(model, "W_REINFORCE", lr=1e-6, steps=3)
    changed = (w.detach() != before).float().mean().item()
    assert changed > 0.99, changed
    # the same update applied to bf16 weights would leave most entries unchanged
    delta = w.detach() - before
    bf16 = before.to(torch.bfloat16)
    changed_bf16 = ((bf16.float() + delta).to(torch.bfloat16) != bf16).float().mean().item()
    assert changed_bf16 < 0.5, changed_bf16


def test_one_update_per_step_has_ratio_one_and_several_make_the_clip_act(model):
    one = train(model, "REINFORCE", lr=1e-2, steps=1, mini_batch_size=4)[0]
    assert one["ratio_max"] == pytest.approx(1.0, abs=1e-5) and one["clip_frac"] == 0.0
    four = train(model, "REINFORCE", lr=5e-2, steps=1, mini_batch_size=1)[0]
    assert four["n_updates"] == 4
    assert four["clip_frac"] > 0.0 and abs(four["ratio_max"] - 1.0) > 0.2


@pytest.mark.parametrize("loss_agg,skipped", [("paper", 0), ("batch_token_mean", 2)])
def test_a_minibatch_without_kept_samples_does_not_step(model, loss_agg, skipped):
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.01)
    adv, keep = compute_advantages(torch.ones(4), "NSR")  # all correct -> nothing kept
    batch = UpdateBatch(PROMPTS, RESPONSES, adv, keep)
    before = [p.detach().clone() for p in model.parameters()]
    s = policy_update(PolicyLogprobs(model), opt, batch, settings(2, loss_agg=loss_agg),
                      torch.Generator().manual_seed(0))
    # paper: nothing kept means no mini-batch at all; batch_token_mean: two empty ones skipped
    assert s["n_updates"] == 0 and s["skipped_empty_minibatches"] == skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # AdamW never stepped, so weight decay never touched the weights
    assert all(st["step"].item() == 0 for st in opt.state.values())


def test_optimizer_state_is_allocated_up_front_and_the_first_step_is_a_true_first_step(
        tiny_model_dir):
    fresh = load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=False)
    pre = load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=False)
    before = [p.detach().clone() for p in pre.parameters()]
    opt_pre = make_optimizer(pre, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    # allocated, zero, step 0 -- and the weights did not move
    for p, b in zip(pre.parameters(), before):
        st = opt_pre.state[p]
        assert st["step"].item() == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        assert torch.equal(p, b)
    assert all(g["lr"] == 1e-2 and g["weight_decay"] == 0.1 for g in opt_pre.param_groups)
    # a real step from the preallocated state equals a real first step of a plain AdamW
    opt_fresh = torch.optim.AdamW(fresh.parameters(), lr=1e-2, betas=(0.9, 0.95),
                                  weight_decay=0.1, eps=1e-8)
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in pre.parameters()]
    for model, opt in ((pre, opt_pre), (fresh, opt_fresh)):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(pre.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


@pytest.mark.parametrize("micro_batch_tokens", [1, None])  # one sample per micro-batch, or all
def test_reported_loss_entropy_and_ratios_are_the_mini_batch_figures(model, micro_batch_tokens):
    # Summed on the device and read once per optimizer step: the figures must still be those of
    # the whole mini-batch, however it is cut into micro-batches.
    adv, keep = compute_advantages(CORRECT, "W_REINFORCE", lam=0.1, group_size=2)
    b = collate(PROMPTS, RESPONSES, PAD, CPU)
    with torch.no_grad():
        logp, ent = token_logprobs(model, b, 1.0, with_entropy=True)
    mask = b["response_mask"].float()
    n_tok = mask.sum()
    # one update at ratio 1: the loss is the token mean of -A, the entropy the token mean of H
    want_loss = ((-adv.unsqueeze(-1) * mask).sum() / n_tok).item()
    want_ent = ((ent * mask).sum() / n_tok).item()
    opt = make_optimizer(model, lr=0.0, weight_decay=0.0)
    s = policy_update(PolicyLogprobs(model), opt, UpdateBatch(PROMPTS, RESPONSES, adv, keep),
                      settings(4, micro_batch_tokens), torch.Generator().manual_seed(0))
    assert s["separate_old_logprob_pass"] == 0.0  # one update: pi_old from its own forward
    assert s["n_updates"] == 1 and s["train_tokens"] == n_tok.item() == 16
    assert s["loss"] == pytest.approx(want_loss, abs=1e-6)
    assert s["entropy"] == pytest.approx(want_ent, rel=1e-4)
    assert s["ratio_mean"] == s["ratio_max"] == s["ratio_min"] == 1.0 and s["clip_frac"] == 0.0
    assert s["grad_norm"] > 0


def _padded_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for j, r in enumerate(rows):
        out[j, :len(r)] = r
    return out


def _shifted(nan_sample):
    """compute_old_logprobs with pi_old shifted so that ratios spread over [e^-0.3, e^0.3] and
    some leave the clip range (NaN for `nan_sample`)."""
    real = training.compute_old_logprobs

    def shifted(*args, **kwargs):
        old, ent = real(*args, **kwargs)
        old = [o + torch.linspace(-0.3, 0.3, len(o)) for o in old]
        if nan_sample is not None:
            old[nan_sample] = torch.full_like(old[nan_sample], float("nan"))
        return old, ent

    return shifted


@pytest.mark.parametrize("nan_sample,mini", [(None, 2), (1, 2), (1, 1)])
def test_reported_figures_over_several_mini_and_micro_batches(model, nan_sample, mini,
                                                              monkeypatch):
    # lr 0 keeps the policy put, so every mini-batch sees the log-probs computed here; a NaN
    # sample's mini-batch is skipped, and its NaN must not hide the others' figures
    adv, keep = compute_advantages(CORRECT, "W_REINFORCE", lam=0.1, group_size=2)
    batch = UpdateBatch(PROMPTS, RESPONSES, adv, keep)
    s = settings(mini, micro_batch_tokens=1)
    old, _ = _shifted(nan_sample)(PolicyLogprobs(model), batch, s)
    monkeypatch.setattr(training, "compute_old_logprobs", _shifted(nan_sample))
    b = collate(PROMPTS, RESPONSES, PAD, CPU)
    with torch.no_grad():
        logp, _ = token_logprobs(model, b, 1.0)
    mask, old_pad = b["response_mask"], _padded_rows(old, b["response_mask"])
    finite = [i for i in range(4) if i != nan_sample]
    want = {k: v.item() for k, v in ratio_stats(logp[finite], old_pad[finite], mask[finite],
                                                0.2).items()}
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    schedule = minibatch_schedule(keep.tolist(), [len(r) for r in RESPONSES], mini, "paper",
                                  order)
    per_tok = per_token_loss(logp, old_pad, adv, 0.2)
    losses = [((per_tok[m.indices] * mask[m.indices]).sum() / m.normalizer).item()
              for m in schedule if nan_sample not in m.indices]
    s = policy_update(PolicyLogprobs(model), make_optimizer(model, lr=0.0, weight_decay=0.0),
                      batch, s, torch.Generator().manual_seed(0))
    assert s["n_updates"] == len(losses) and s["nonfinite_minibatches"] == 4 // mini - len(losses)
    if losses:
        assert s["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert 0 < want["n_clipped"] < want["n_tokens"]
    assert s["ratio_max"] == pytest.approx(want["ratio_max"], rel=1e-5)
    assert s["ratio_min"] == pytest.approx(want["ratio_min"], rel=1e-5)
    assert s["clip_frac"] == pytest.approx(want["n_clipped"] / s["train_tokens"])
    if nan_sample is None:
        assert s["ratio_mean"] == pytest.approx(want["ratio_sum"] / want["n_tokens"], rel=1e-5)
