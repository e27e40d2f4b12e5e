"""Data parallel on CPU (gloo): `torchrun --nproc_per_node 2` equals one process on the same
global batch, a 2-rank checkpoint resumes at world size 1, FSDP2's update equals the unsharded
one, and a crashing rank ends the job with its message. One torchrun launch runs every case
(tests/dist_worker.py); the one-process references run in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "dist_worker.py"
OBJECTIVES = ("PSR", "NSR", "W_REINFORCE")


def torchrun(*args: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(WORKER), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    proc = torchrun(str(tiny_model_dir), str(tiny_data_dir), str(out), *OBJECTIVES, "resume",
                    "fsdp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    import dist_worker

    out = tmp_path_factory.mktemp("one_rank")
    dist_worker.run(str(tiny_model_dir), str(tiny_data_dir), str(out), list(OBJECTIVES))
    return out


def train_lines(run_dir: Path) -> list[dict]:
    return [ln for ln in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in ln]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from rlvr.checkpoint import load_policy_state

    return load_policy_state(ckpt)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_two_ranks_equal_one_process_on_the_same_global_batch(two_ranks, one_rank, objective):
    import dist_worker

    # rewards: every sample's, step by step; rank r holds prompts r*4 .. r*4+3 of each step
    alone = dist_worker.step_scores(one_rank, objective, 0)
    ranks = [dist_worker.step_scores(two_ranks, objective, r) for r in (0, 1)]
    assert len(alone) == 3 and [a + b for a, b in zip(*ranks)] == alone
    if objective != "W_REINFORCE":  # the ranks keep different numbers of samples
        keep = 1.0 if objective == "PSR" else 0.0
        assert any(r0.count(keep) != r1.count(keep) for r0, r1 in zip(*ranks)), ranks
    a, b = train_lines(one_rank / objective), train_lines(two_ranks / objective)
    assert [ln["step"] for ln in a] == [ln["step"] for ln in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("train/reward_mean", "train/samples_kept", "train/n_updates",
                    "train/response_len", "train/no_signal_frac", "train/truncated_frac"):
            assert x[key] == y[key], key
        assert x["train/n_updates"] > 1  # several mini-batches: a separate pi_old pass
        for key in ("train/loss", "train/grad_norm", "train/entropy", "train/ratio_max"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
    assert max_diff(weights(one_rank / objective / "checkpoints" / "step_3"),
                    weights(two_ranks / objective / "checkpoints" / "step_3")) < 1e-5
    cfg = json.loads((two_ranks / objective / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["mode"] == "ddp"
    assert len(list((two_ranks / objective).glob("events.out.tfevents.*"))) == 1  # rank 0's


def test_a_two_rank_checkpoint_resumes_at_world_size_one(two_ranks, one_rank, tiny_model_dir,
                                                         tiny_data_dir, monkeypatch):
    import dist_worker

    monkeypatch.setattr(dist_worker.experiment, "BatchGrader", dist_worker.HashGrader)
    dist_worker.HashGrader.log = None
    args = dist_worker.args("resume", str(tiny_model_dir), str(tiny_data_dir), str(two_ranks))
    assert dist_worker.experiment.main([*args, "--n_train_steps", "3", "--resume"]) == 0
    resumed = two_ranks / "resume"
    assert max_diff(weights(one_rank / "W_REINFORCE" / "checkpoints" / "step_3"),
                    weights(resumed / "checkpoints" / "step_3")) < 1e-5
    step3 = train_lines(resumed)[-1]
    alone = train_lines(one_rank / "W_REINFORCE")[-1]
    assert step3["step"] == 3 and step3["train/reward_mean"] == alone["train/reward_mean"]
    assert step3["train/loss"] == pytest.approx(alone["train/loss"], rel=1e-5)
    cfg = json.loads((resumed / "config.json").read_text())
    assert cfg["world_size"] == 1 and cfg["resumes"][-1]["world_size"] == 1


def test_fsdp2_update_checkpoint_and_final_model_equal_one_process(two_ranks, tiny_model_dir):
    """The policy and the KL reference sharded over 2 ranks: every figure and weight of two
    updates (four mini-batches each, uneven micro-batches) as unsharded; its DCP checkpoint
    loads at world size 1 and training continues alike; the final model is one HF directory."""
    import dist_worker
    from transformers import AutoModelForCausalLM

    from rlvr.checkpoint import load_checkpoint
    from rlvr.logprobs import PolicyLogprobs
    from rlvr.modeling import load_policy
    from rlvr.optimizers import make_optimizer

    cpu = torch.device("cpu")
    ref = PolicyLogprobs(load_policy(str(tiny_model_dir), cpu, False).requires_grad_(False))

    def fresh():
        policy = load_policy(str(tiny_model_dir), cpu, gradient_checkpointing=True)
        return policy, make_optimizer(policy, 1e-3, 0.01)

    policy, opt = fresh()
    alone = dist_worker.update_steps(PolicyLogprobs(policy), opt, dist_worker.fsdp_batch(), ref)
    sharded = torch.load(two_ranks / "fsdp_result.pt")
    for a, b in zip(alone, sharded["stats"], strict=True):
        assert a["n_updates"] == b["n_updates"] == 4 and a["train_tokens"] == b["train_tokens"]
        for key in ("loss", "grad_norm", "entropy", "ratio_max", "ratio_min", "clip_frac"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert sharded["stats"][1]["clip_frac"] > 0  # the second step's later mini-batches clip
    assert max_diff(dict(policy.named_parameters()), sharded["weights"]) < 1e-5
    ckpt = two_ranks / "fsdp" / "checkpoints" / f"step_{dist_worker.FSDP_STEPS}"
    assert (ckpt / "dcp").is_dir() and not (ckpt / "policy.safetensors").exists()
    resumed, resumed_opt = fresh()
    load_checkpoint(ckpt, resumed, resumed_opt)
    for p, o in ((policy, opt), (resumed, resumed_opt)):
        dist_worker.update_steps(PolicyLogprobs(p), o, dist_worker.fsdp_batch(), ref)
    assert max_diff(dict(policy.named_parameters()), dict(resumed.named_parameters())) < 1e-5
    final = AutoModelForCausalLM.from_pretrained(two_ranks / "fsdp" / "final_model")
    assert final.dtype == torch.bfloat16 and final.lm_head.weight is final.model.embed_tokens.weight
    torch.testing.assert_close(final.model.embed_tokens.weight,
                               sharded["weights"]["model.embed_tokens.weight"].bfloat16())


CRASH_ON_RANK_1 = '''
import importlib.abc, importlib.machinery, os, sys

class CrashOnUpdate(importlib.abc.MetaPathFinder):
    """On rank 1: rlvr.training.policy_update raises, once the module is imported."""

    def find_spec(self, name, path, target=None):
        if name != "rlvr.training":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)

            def policy_update(*args, **kwargs):
                raise RuntimeError("injected failure on rank 1")

            module.policy_update = policy_update

        spec.loader.exec_module = exec_module
        return spec

if os.environ.get("RANK") == "1":
    sys.meta_path.insert(0, CrashOnUpdate())
'''


def test_a_crashing_rank_ends_every_rank_with_its_message(tmp_path, tiny_model_dir,
                                                          tiny_data_dir):
    """Rank 1 fails in its first update while rank 0 waits for it in a collective: torchrun's
    agent ends rank 0 (no hang until the collective's timeout) and reports rank 1's error."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(CRASH_ON_RANK_1)
    t0 = time.perf_counter()
    proc = torchrun(str(tiny_model_dir), str(tiny_data_dir), str(tmp_path / "out"), "NSR",
                    env={"PYTHONPATH": str(tmp_path / "site")}, timeout=120)
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in proc.stderr
    assert "Root Cause" in proc.stderr and "rank      : 1" in proc.stderr
    assert time.perf_counter() - t0 < 90  # the collective's timeout is 30 minutes
