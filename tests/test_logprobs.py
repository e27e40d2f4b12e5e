"""Packed (padding-free) batches give the padded batches' log-probs, entropies and gradients."""

import warnings

import pytest
import torch

from rlvr import attention, logprobs
from rlvr.attention import enable_packed_attention
from rlvr.logprobs import (
    collate,
    pack,
    token_budget_groups,
    token_logprobs,
)
from rlvr.modeling import load_policy

CPU = torch.device("cpu")
TEMP = 0.7
# fp32 on CPU: the two layouts differ only in summation order
TOL = dict(atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=False)
    m.train()  # as in the update: no dropout in Qwen2, so outputs are deterministic
    return m


def _sample(prompt_lens, resp_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(0, 250, (n,), generator=g).tolist() for n in resp_lens]
    return prompts, responses


# uneven lengths, an empty response, a response longer than its prompt
UNEVEN = _sample((7, 3, 5, 4), (4, 9, 0, 6))


def _forward_backward(model, batch, coef, chunk_tokens=None, entropy_grad=False):
    """log-probs, entropy and all weight gradients of a token-weighted loss."""
    model.zero_grad(set_to_none=True)
    logp, ent = token_logprobs(model, batch, TEMP, with_entropy=True, chunk_tokens=chunk_tokens,
                               entropy_grad=entropy_grad)
    loss = (logp * coef).sum() + (0.3 * (ent * coef).sum() if entropy_grad else 0.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), ent.detach(), grads


def _coef(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch["response_mask"].shape, generator=g) * batch["response_mask"]


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], **TOL)
    assert a[2].keys() == b[2].keys() and len(a[2]) > 0
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], **TOL, msg=name)


def test_pack_layout():
    b = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], CPU)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6, 4, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert b["cu_seqlens"].tolist() == [0, 5, 9] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 5
    # token 5 sits at flat index 3 and is predicted by the hidden state at 2; token 7 (index 6)
    # by index 5, the second sequence's last prompt token
    assert b["positions"].tolist() == [[2, 3, 0], [5, 6, 7]]
    c = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, device=CPU)
    for key in ("targets", "response_mask"):
        assert b[key].tolist() == c[key].tolist()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_every_response_token_is_predicted_by_the_state_before_it(layout):
    prompts, responses = UNEVEN
    b = pack(prompts, responses, CPU) if layout == "packed" else collate(prompts, responses, 0, CPU)
    ids = b["input_ids"]
    row = torch.arange(ids.shape[0])[:, None] if layout == "padded" else 0
    nxt = ids[row, b["positions"] + 1] if layout == "padded" else ids[0, b["positions"] + 1]
    m = b["response_mask"].bool()
    assert torch.equal(nxt[m], b["targets"][m])
    assert int(m.sum()) == sum(len(r) for r in responses) == b["token_pos"].numel()


def test_packed_logprobs_entropy_and_gradients_equal_padded(model):
    prompts, responses = UNEVEN
    padded, packed = collate(prompts, responses, 257, CPU), pack(prompts, responses, CPU)
    coef = _coef(padded)
    a = _forward_backward(model, padded, coef, entropy_grad=True)
    b = _forward_backward(model, packed, coef, entropy_grad=True)
    _assert_same(a, b)
    assert a[0][2].abs().sum() == 0 and b[1][2].abs().sum() == 0  # the empty response
    assert a[0][0, 4:].abs().sum() == 0  # padding slots


def test_chunk_boundaries_change_nothing(model):
    prompts, responses = UNEVEN
    packed = pack(prompts, responses, CPU)
    coef = _coef(packed)
    whole = _forward_backward(model, packed, coef, chunk_tokens=10_000, entropy_grad=True)
    for chunk in (1, 3, 5):  # smaller than a sequence; 19 tokens do not divide evenly
        _assert_same(whole, _forward_backward(model, packed, coef, chunk_tokens=chunk,
                                              entropy_grad=True))


def test_entropy_gradient_matches_a_naive_full_softmax(model):
    """(the padded layout's entropy gradient equals the packed one's, tested above)"""
    prompts, responses = UNEVEN
    b = pack(prompts, responses, CPU)
    model.zero_grad(set_to_none=True)
    _, ent = token_logprobs(model, b, TEMP, with_entropy=True, chunk_tokens=4, entropy_grad=True)
    ent.sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    naive = 0.0
    for p, r in zip(prompts, responses):
        logits = model(torch.tensor([p + r])).logits[0].float() / TEMP
        lp = torch.log_softmax(logits, -1)[len(p) - 1:len(p) + len(r) - 1]
        naive = naive + (-(lp.exp() * lp).sum())
    naive.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, **TOL, msg=n)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hand_written_head_backward_equals_autograd(entropy_grad, temperature):
    """_ChunkHead (recompute + closed-form backward) vs the plain-autograd reference."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (6,), generator=g)
    g_lp, g_ent = torch.randn(6, generator=g), torch.randn(6, generator=g)
    out = {}
    for name, fn in (("hand", lambda *a: logprobs._ChunkHead.apply(*a[:4], True, a[4])),
                     ("ref", logprobs._chunk_logp_entropy)):
        lp, ent = fn(hidden, weight, targets, 1 / temperature, entropy_grad)
        loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if entropy_grad else 0.0)
        out[name] = (lp, ent, *torch.autograd.grad(loss, (hidden, weight)))
    for a, b in zip(out["hand"], out["ref"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_entropy_without_entropy_grad_carries_no_gradient(model):
    b = pack(*UNEVEN, CPU)
    logp, ent = token_logprobs(model, b, TEMP, with_entropy=True)
    assert logp.requires_grad and not ent.requires_grad


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_a_batch_without_response_tokens_still_backpropagates(model, layout):
    prompts, responses = [[1, 2, 3], [4, 5]], [[], []]
    b = pack(prompts, responses, CPU) if layout == "packed" else collate(prompts, responses, 0, CPU)
    logp, ent = token_logprobs(model, b, TEMP, with_entropy=True)
    assert logp.shape == (2, 1) and logp.abs().sum() == 0 and ent.abs().sum() == 0
    logp.sum().backward()  # the update calls backward on every micro-batch
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_no_grad_path_equals_grad_path(model):
    b = pack(*UNEVEN, CPU)
    with torch.no_grad():
        lp0, ent0 = token_logprobs(model, b, TEMP, with_entropy=True, chunk_tokens=4)
        lp1, _ = token_logprobs(model, b, TEMP, chunk_tokens=4)
    lp2, ent2 = token_logprobs(model, b, TEMP, with_entropy=True, chunk_tokens=4)
    torch.testing.assert_close(lp0, lp2.detach(), **TOL)
    torch.testing.assert_close(lp1, lp2.detach(), **TOL)
    torch.testing.assert_close(ent0, ent2, **TOL)


def test_token_budget_groups():
    lengths = [5, 30, 12, 7, 7, 40, 1, 25]
    groups = token_budget_groups(lengths, max_tokens=32, max_samples=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups[0] == [5]  # the longest, alone since it is over the budget, comes first
    for g in groups:
        assert len(g) <= 3
        assert len(g) == 1 or sum(lengths[i] for i in g) <= 32
    assert len(token_budget_groups(lengths, None)) == 1
    assert token_budget_groups(lengths, 1) == [[5], [1], [7], [2], [3], [4], [0], [6]]


def test_auto_attention_on_cpu_is_sdpa(model):
    assert enable_packed_attention(model) == "sdpa"
    assert model.config._attn_implementation == "sdpa"


# --- the varlen attention function, its kernel replaced by a CPU reference of each torch API ---


def _reference_attention(q, k, v, cu, scale):
    """Causal softmax attention of each sequence on its own: q [N, H, D], k, v [N, H or Hkv, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        att = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale
        causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", att, v[s:e]))
    return torch.cat(out)


def _fake_varlen(api, calls):
    def torch_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                  return_aux=None):
        assert is_causal and key.shape[1] == query.shape[1]
        calls.append(key.shape[1])
        return _reference_attention(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)

    def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                   scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and key.shape[1] == query.shape[1]  # no GQA in this API
        assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
        calls.append(key.shape[1])
        return _reference_attention(query, key, value, cu_seq_q, scale)

    def torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                   scale=None, window_size=(-1, -1), enable_gqa=False):
        assert window_size == (-1, 0) and enable_gqa
        calls.append(key.shape[1])
        return _reference_attention(query, key, value, cu_seq_q, scale)

    return {"2.9": torch_2_9, "2.11": torch_2_11, "2.13": torch_2_13}[api]


@pytest.mark.parametrize("api", ["2.9", "2.11", "2.13"])
def test_varlen_attention_path_equals_padded_with_checkpointing(tiny_model_dir, monkeypatch, api):
    import inspect

    calls = []
    fake = _fake_varlen(api, calls)
    monkeypatch.setattr(attention, "_VARLEN", fake)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset(inspect.signature(fake).parameters))
    model = load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=True)
    model.train()
    prompts, responses = UNEVEN
    padded, packed = collate(prompts, responses, 257, CPU), pack(prompts, responses, CPU)
    coef = _coef(padded)
    sdpa = _forward_backward(model, padded, coef, entropy_grad=True)
    assert enable_packed_attention(model, "varlen") == "varlen"
    _assert_same(sdpa, _forward_backward(model, packed, coef, entropy_grad=True))
    # 2 layers, forward + checkpoint recompute; K/V reach the kernel with 2 heads only where
    # the API has enable_gqa, repeated to the 4 query heads otherwise
    assert calls == [2 if api == "2.13" else 4] * 4
    calls.clear()
    # padded batches under the varlen name are plain sdpa, kernel untouched
    _assert_same(sdpa, _forward_backward(model, padded, coef, entropy_grad=True))
    assert calls == []


def test_gpu_autocast_keeps_no_weight_cache_unless_asked():
    """With a cache, autocast would hold a bf16 copy of every fp32 weight until the forward ends
    (5.8 GiB at 3B) although checkpointing frees everything else; the HF engine's generate, one
    context around many forwards, asks for it."""
    from rlvr.logprobs import autocast_ctx

    cuda = torch.device("cuda")  # building the context needs no GPU (torch warns without one)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        no_cache, cache = autocast_ctx(cuda), autocast_ctx(cuda, cache=True)
    assert no_cache._cache_enabled is False and cache._cache_enabled is True
    assert no_cache.fast_dtype == torch.bfloat16
