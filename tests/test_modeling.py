"""Log-prob alignment: chunked trainer log-probs vs a naive softmax, and vs the sampler's own."""

import pytest
import torch

from rlvr.engines import HFEngine
from rlvr.logprobs import collate, token_logprobs
from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer
from rlvr.prompts import encode_prompt

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def policy_and_tok(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    return load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=False), tok


def test_collate_points_each_response_token_at_the_state_that_predicts_it():
    b = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0, device=CPU)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # token 5 sits at index 3 and is predicted by the hidden state at index 2
    assert b["positions"].tolist() == [[2, 3, 0], [0, 1, 2]]
    assert b["targets"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert b["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_chunked_logprobs_and_entropy_match_a_naive_full_softmax(policy_and_tok):
    model, _ = policy_and_tok
    torch.manual_seed(0)
    prompts = [torch.randint(0, 250, (n,)).tolist() for n in (7, 3, 5)]
    responses = [torch.randint(0, 250, (n,)).tolist() for n in (4, 6, 1)]
    b = collate(prompts, responses, pad_id=257, device=CPU)
    temp = 0.7
    with torch.no_grad():
        logp, ent = token_logprobs(model, b, temp, with_entropy=True, chunk_tokens=5)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r])).logits[0].float() / temp
            ref = torch.log_softmax(logits, -1)
            want = ref[len(p) - 1:len(p) + len(r) - 1].gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(logp[i, :len(r)], want, atol=1e-5, rtol=1e-5)
            want_ent = -(ref.exp() * ref).sum(-1)[len(p) - 1:len(p) + len(r) - 1]
            torch.testing.assert_close(ent[i, :len(r)], want_ent, atol=1e-5, rtol=1e-5)
            assert logp[i, len(r):].abs().sum() == 0  # padding contributes nothing


def test_chunked_logprob_gradient_matches_unchunked(policy_and_tok):
    model, _ = policy_and_tok
    b = collate([[1, 2, 3, 4]], [[5, 6, 7, 8, 9]], pad_id=257, device=CPU)

    def grads(chunk):
        model.zero_grad()
        logp, _ = token_logprobs(model, b, 1.0, chunk_tokens=chunk)
        logp.sum().backward()
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    torch.testing.assert_close(grads(2), grads(10_000), atol=1e-6, rtol=1e-5)
    model.zero_grad()


def test_hf_engine_samples_from_the_policy_not_the_checkpoint_generation_config(
        policy_and_tok, tiny_model_dir):
    """The tiny checkpoint ships top_k 20 / top_p 0.8 / repetition penalty: if any leaked into
    sampling, the engine's per-step log-probs would differ from the trainer's at the same
    temperature (top-k renormalises every step's distribution)."""
    model, tok = policy_and_tok
    assert model.generation_config.top_k == 20  # the trap is armed
    engine = HFEngine(model, tok, eos_token_ids(model, tok))
    torch.manual_seed(0)
    prompt = encode_prompt(tok, "What is 1+1?")
    outs = engine.generate([prompt], n=3, temperature=0.8, max_tokens=12, return_logprobs=True)
    for c in outs[0]:
        assert len(c.token_ids) <= 12 and c.logprobs is not None
        b = collate([prompt], [c.token_ids], tok.pad_token_id, CPU)
        with torch.no_grad():
            logp, _ = token_logprobs(model, b, 0.8)
        torch.testing.assert_close(logp[0, :len(c.token_ids)], torch.tensor(c.logprobs),
                                   atol=1e-4, rtol=1e-4)
        eos = set(engine.eos_ids)
        if c.truncated:
            assert len(c.token_ids) == 12 and not eos & set(c.token_ids)
        else:  # the EOS it emitted is kept, as the last token, so the update trains on it
            assert c.token_ids[-1] in eos and not eos & set(c.token_ids[:-1])
    assert model.generation_config.top_k == 20  # restored after generate


def test_hf_engine_greedy_is_deterministic(policy_and_tok):
    model, tok = policy_and_tok
    engine = HFEngine(model, tok, eos_token_ids(model, tok))
    prompt = encode_prompt(tok, "What is 2+2?")
    a = engine.generate([prompt], n=1, temperature=0, max_tokens=8)[0][0].token_ids
    b = engine.generate([prompt], n=1, temperature=0, max_tokens=8)[0][0].token_ids
    assert a == b
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    assert a[0] == int(logits.argmax())


def test_policy_weights_are_fp32_masters(policy_and_tok):
    model, _ = policy_and_tok
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_models_whose_logits_are_not_a_plain_projection_are_refused(tiny_model_dir, tmp_path):
    """token_logprobs computes hidden @ lm_head.weight^T; a softcapped or scaled head would get
    silently wrong log-probs, so it is refused at load time."""
    import json
    import shutil

    bad = tmp_path / "softcapped"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        load_policy(str(bad), CPU, gradient_checkpointing=False)
