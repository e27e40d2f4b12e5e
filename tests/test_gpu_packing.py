"""GPU checks of packed batches (varlen attention) and torch.compile (run on the device).

A random-weight model of the Qwen2.5-0.5B shape, fp32 master weights, bf16 autocast, as in
training. "Within bf16 noise" is measured, not assumed: the padded-sdpa batch in bf16 vs the same
batch in fp32 (no autocast) sets the noise floor, and packed-varlen (or compiled) vs padded-sdpa,
both bf16, must stay within BOUND x that floor (two bf16 runs that each sit ~1 floor from fp32
differ by up to ~1.4 floors when their rounding is independent). A wrongly masked packed batch
is checked to land well outside it. Numbers go to $RLVR_GPU_PACKING_REPORT (JSON) if set.
"""

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_common import report_fixture  # noqa: E402

from rlvr.attention import compile_decoder_layers, enable_packed_attention  # noqa: E402
from rlvr.logprobs import (  # noqa: E402
    autocast_ctx,
    collate,
    compile_logit_head,
    pack,
    token_logprobs,
    use_logit_head,
)
from rlvr.modeling import load_policy  # noqa: E402

CUDA = torch.device("cuda")
TEMP = 0.7
BOUND = 2.0  # x the bf16-vs-fp32 noise floor (mean and max), plus a small absolute slack
REPORT: dict[str, float] = {}
# uneven, one response truncated at 512, one of a single token, one empty
PROMPT_LENS = (90, 120, 60, 100, 85, 110, 95, 70)
RESP_LENS = (512, 350, 1, 200, 512, 37, 400, 0)


write_report = report_fixture(REPORT, "RLVR_GPU_PACKING_REPORT", "GPU packing report")


@pytest.fixture(scope="module")
def model(random_qwen_05b):
    m = load_policy(str(random_qwen_05b[0]), CUDA, gradient_checkpointing=False)
    m.train()
    impl = enable_packed_attention(m)
    if impl != "varlen":
        pytest.skip(f"no varlen attention in torch {torch.__version__}")
    return m


def _batch(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 30000, (int(n * scale),), generator=g).tolist()
               for n in PROMPT_LENS]
    responses = [torch.randint(0, 30000, (int(n * scale),), generator=g).tolist()
                 for n in RESP_LENS]
    return prompts, responses


def _run(model, batch: dict, bf16: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real-token log-probs, entropies and the flat weight gradient of a token-weighted loss."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    mask = batch["response_mask"]
    with autocast_ctx(CUDA) if bf16 else torch.autocast("cuda", enabled=False):
        logp, ent = token_logprobs(model, batch, TEMP, with_entropy=True)
    coef = torch.randn(mask.shape, generator=g, device="cuda") * mask
    ((logp * coef).sum() / mask.sum()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    m = mask.bool()
    return logp.detach()[m], ent.detach()[m], grad


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).abs()
    return d.mean().item(), d.max().item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_within_noise(name: str, got, floor) -> None:
    REPORT[f"{name}_mean"], REPORT[f"{name}_max"] = got
    assert got[0] <= BOUND * floor[0] + 1e-3, (name, got, floor)
    assert got[1] <= BOUND * floor[1] + 2e-2, (name, got, floor)


@pytest.fixture(scope="module")
def reference(model):
    """padded sdpa in bf16 (what training did before) and in fp32 (the noise floor)."""
    prompts, responses = _batch()
    padded = collate(prompts, responses, 0, CUDA)
    bf16, fp32 = _run(model, padded), _run(model, padded, bf16=False)
    floor = {"logp": _diff(bf16[0], fp32[0]), "ent": _diff(bf16[1], fp32[1]),
             "grad": _rel(bf16[2], fp32[2])}
    REPORT.update({"floor_logp_mean": floor["logp"][0], "floor_logp_max": floor["logp"][1],
                   "floor_ent_mean": floor["ent"][0], "floor_grad_rel": floor["grad"]})
    return bf16, floor, pack(prompts, responses, CUDA)


def test_varlen_packed_matches_padded_sdpa(model, reference):
    (logp, ent, grad), floor, packed = reference
    got = _run(model, packed)
    _assert_within_noise("varlen_logp", _diff(got[0], logp), floor["logp"])
    _assert_within_noise("varlen_ent", _diff(got[1], ent), floor["ent"])
    REPORT["varlen_grad_rel"] = _rel(got[2], grad)
    assert REPORT["varlen_grad_rel"] <= BOUND * floor["grad"] + 1e-3
    # teeth: the same packed row attended as one plain causal sequence (no cu_seqlens, positions
    # not restarting) mixes the samples; it must land far outside the bound
    wrong = {k: v for k, v in packed.items() if k not in ("cu_seqlens", "position_ids")}
    wrong["attention_mask"] = torch.ones_like(packed["input_ids"])
    bad = _diff(_run(model, wrong)[0], logp)
    REPORT["wrong_mask_logp_mean"] = bad[0]
    assert bad[0] > 3 * (BOUND * floor["logp"][0] + 1e-3)


def test_varlen_with_gradient_checkpointing(model, reference):
    (logp, _, grad), floor, packed = reference
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        got = _run(model, packed)
    finally:
        model.gradient_checkpointing_disable()
    _assert_within_noise("varlen_ckpt_logp", _diff(got[0], logp), floor["logp"])
    REPORT["varlen_ckpt_grad_rel"] = _rel(got[2], grad)
    assert REPORT["varlen_ckpt_grad_rel"] <= BOUND * floor["grad"] + 1e-3


def test_fused_head_matches_the_autograd_head(model, reference):
    """The eager LM head (_ChunkHead) vs what it replaced: autograd under checkpoint."""
    _, floor, packed = reference
    hand = _run(model, packed)
    use_logit_head("autograd")
    try:
        ref = _run(model, packed)
    finally:
        use_logit_head("fused")
    _assert_within_noise("head_logp", _diff(hand[0], ref[0]), floor["logp"])
    _assert_within_noise("head_ent", _diff(hand[1], ref[1]), floor["ent"])
    REPORT["head_grad_rel"] = _rel(hand[2], ref[2])
    assert REPORT["head_grad_rel"] <= BOUND * floor["grad"] + 1e-3


def test_compiled_matches_eager_without_recompiling(model, reference):
    import torch._dynamo

    (logp, ent, grad), floor, packed = reference
    eager = _run(model, packed)
    compile_decoder_layers(model)
    compile_logit_head()
    try:
        got = _run(model, packed)
        _assert_within_noise("compiled_logp", _diff(got[0], eager[0]), floor["logp"])
        _assert_within_noise("compiled_ent", _diff(got[1], eager[1]), floor["ent"])
        REPORT["compiled_grad_rel"] = _rel(got[2], eager[2])
        assert REPORT["compiled_grad_rel"] <= BOUND * floor["grad"] + 1e-3
        # new N, new max length, new number of sequences, and checkpointing: no new graphs
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for seed, scale in ((1, 0.7), (2, 0.45)):
            prompts, responses = _batch(seed, scale)
            _run(model, pack(prompts[:-seed], responses[:-seed], CUDA))
        REPORT["recompiles_after_first_step"] = (
            torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs)
        assert REPORT["recompiles_after_first_step"] == 0
    finally:
        model.gradient_checkpointing_disable()
        compile_decoder_layers(model, enable=False)
        compile_logit_head(enable=False)
