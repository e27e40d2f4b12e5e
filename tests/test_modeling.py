"""Log-prob alignment: chunked trainer log-probs vs a naive softmax, and vs the sampler's own;
loading policies, and checking a model source before loading anything."""

import http.server
import socket
import threading
import time

import pytest
import torch

from rlvr.engines import HFEngine
from rlvr.logprobs import collate, token_logprobs
from rlvr.modeling import (
    ModelSourceError,
    check_model_source,
    eos_token_ids,
    load_policy,
    load_tokenizer,
)
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


def test_policy_loads_directly_in_the_dtype_asked_for(tiny_model_dir, policy_and_tok):
    model = load_policy(str(tiny_model_dir), CPU, gradient_checkpointing=False,
                        dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    fp32 = dict(policy_and_tok[0].named_parameters())
    for name, p in model.named_parameters():  # the same weights, rounded once
        torch.testing.assert_close(p, fp32[name].to(torch.bfloat16), atol=0, rtol=0)


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


# --- check_model_source: a bad --model_id fails in seconds, in one line -----------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache with nothing in it, and no offline switch from the environment."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "hub"


def one_line_error(model_id: str) -> str:
    t0 = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        check_model_source(model_id)
    assert time.monotonic() - t0 < 5.0
    message = str(info.value)
    assert "\n" not in message and model_id in message
    return message


@pytest.mark.parametrize("model_id", ["/nonexistent/model", "./no_such_model",
                                      "../no_such_model", "~/no_such_model_h10", "nope.gguf"])
def test_a_missing_local_path_says_so(model_id):
    assert "does not exist" in one_line_error(model_id)


def test_existing_local_sources_pass_and_others_are_named(tiny_model_dir, tmp_path):
    check_model_source(str(tiny_model_dir))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    check_model_source(str(tmp_path / "m.gguf"))
    assert "no config.json" in one_line_error(str(tmp_path))
    (tmp_path / "dir.gguf").mkdir()
    assert "not a .gguf file" in one_line_error(str(tmp_path / "dir.gguf"))
    assert "nor a valid hub id" in one_line_error("no such/path here")


def test_an_unreachable_hub_fails_fast_with_the_way_out(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    message = one_line_error("Qwen/Qwen2.5-0.5B-Instruct")
    assert "cannot be reached" in message and "local model directory or a .gguf" in message


def test_a_hub_that_never_answers_counts_as_unreachable(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert "cannot be reached" in one_line_error("org/model")


def test_the_default_model_fails_fast_without_network(empty_hub_cache):
    """No network here, which is the case of the issue; with one, the check passes quickly."""
    t0 = time.monotonic()
    try:
        check_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    except ModelSourceError as e:
        assert "\n" not in str(e)
    assert time.monotonic() - t0 < 5.0


def test_offline_mode_never_probes_and_cached_models_pass(empty_hub_cache, monkeypatch):
    import rlvr.modeling

    monkeypatch.setattr(rlvr.modeling, "_probe_hub", lambda *a: pytest.fail("probed offline"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE" in one_line_error("org/model")
    snapshot = empty_hub_cache / "models--org--model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (empty_hub_cache / "models--org--model" / "refs").mkdir()
    (empty_hub_cache / "models--org--model" / "refs" / "main").write_text("abc123")
    check_model_source("org/model")


def test_a_model_the_hub_does_not_have_is_named(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert "no such model on the hub" in one_line_error("org/no-such-model")
    finally:
        server.shutdown()


def test_the_memory_plan_reads_a_known_models_shape_after_one_bounded_probe(empty_hub_cache,
                                                                             monkeypatch):
    """--dry_run with a hub id the hub cannot serve: one probe of the hub (bounded), then the
    built-in config.json, without handing the hub client its retries."""
    import huggingface_hub
    from huggingface_hub import constants

    import rlvr.modeling
    from rlvr.memory import KNOWN_SHAPES
    from rlvr.run_plan import read_model_config

    probes = []
    monkeypatch.setattr(rlvr.modeling, "_probe_hub",
                        lambda model_id, timeout_s: probes.append(timeout_s) or "no answer")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: pytest.fail("the hub client was asked after the probe"))
    model_cfg, source = read_model_config("Qwen/Qwen2.5-0.5B-Instruct")
    assert model_cfg == KNOWN_SHAPES["Qwen/Qwen2.5-0.5B-Instruct"] and "built-in" in source
    assert probes == [rlvr.modeling.HUB_PROBE_TIMEOUT_S]
    with pytest.raises(ModelSourceError, match="cannot be reached"):  # no built-in copy
        read_model_config("org/unknown-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: not even a probe
    assert read_model_config("Qwen/Qwen2.5-3B-Instruct")[0] == \
        KNOWN_SHAPES["Qwen/Qwen2.5-3B-Instruct"] and len(probes) == 2
