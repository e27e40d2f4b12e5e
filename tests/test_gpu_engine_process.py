"""GPU checks of the engines in processes of their own (rlvr/engine_process.py) with vLLM: the
weights cross by CUDA IPC, a concurrent eval gives the records of a blocking one, and one-step-off
rollouts run the loop with the staleness they claim. Run this module in a pytest process of its
own (test_gpu.py keeps an in-process sleep-mode engine, and vLLM allows one per process).
Measured agreement goes to $RLVR_GPU_ENGINE_REPORT (JSON) if set.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_common import REPO, report_fixture  # noqa: E402
from recording_logger import RecordingLogger  # noqa: E402

from rlvr import experiment  # noqa: E402
from rlvr.config import parse_config  # noqa: E402
from rlvr.fsdp import full_tensors  # noqa: E402
from rlvr.loop_evals import LoopEvals  # noqa: E402

REPORT: dict[str, float] = {}
write_report = report_fixture(REPORT, "RLVR_GPU_ENGINE_REPORT", "GPU engine-process report")


def flags(model_dir, out, *extra) -> list[str]:
    return ["--backend", "vllm", "--model_id", str(model_dir), "--gpu_memory_gb", "79",
            "--rollout_batch_size", "16", "--rollouts_per_prompt", "4", "--max_tokens", "96",
            "--eval_n", "4", "--eval_limit", "48", "--n_eval_examples_logged", "48",
            "--data_dir", str(REPO / "data/math_subset"), "--output_dir", str(out),
            "--save_every", "0", *extra]


@torch.no_grad()
def perturb(policy, seed: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in policy.named_parameters():
        if "layers" in name and p.dim() == 2:
            p.add_(torch.randn(p.shape, generator=g, device="cuda") * 0.05 * p.std())


# First: it leaves no engine behind in this process (the rollout engine is a process of its own).
def test_one_step_off_rollouts_run_one_update_behind(random_qwen_05b, tmp_path):
    model_dir, _ = random_qwen_05b
    cfg = parse_config(flags(model_dir, tmp_path, "--exp_name", "async", "--async_rollout",
                             "--n_train_steps", "4", "--eval_every", "100", "--eval_limit", "16"))
    assert cfg.rollout_is == "tis"
    assert experiment.main(cfg=cfg) == 0
    lines = [json.loads(x) for x in (tmp_path / "async/metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "train/rollout_staleness" in ln]
    assert [ln["train/rollout_staleness"] for ln in steps] == [0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(ln["train/loss"])) for ln in steps)
    REPORT["async_step_s_last"] = steps[-1]["time/step_s"]


def test_a_concurrent_eval_on_vllm_gives_the_records_of_a_blocking_one(random_qwen_05b, tmp_path):
    """The same weights and per-problem seeds on two engines of other batch sizes: vLLM's kernels
    are not batch-invariant, so a sample may part from its twin after a near-tie; nearly all
    must be the same, and the eval engine must not see the weights that changed after the start."""
    model_dir, _ = random_qwen_05b
    cfg = parse_config(flags(model_dir, tmp_path, "--exp_name", "conc",
                             "--concurrent_eval", "true", "--eval_max_num_seqs", "256"))
    run = experiment.build(cfg)
    try:
        assert len(run.eval_engines) == 2  # each evaluates its half of the problems
        perturb(run.policy, 1)
        run.engine.load_weights(full_tensors(run.policy))  # step 5's weights, synced
        blocking = RecordingLogger()
        LoopEvals(run, blocking).start(5)
        concurrent = RecordingLogger()
        evals = LoopEvals(run, concurrent, run.eval_engines)
        evals.start(5)
        perturb(run.policy, 2)  # training goes on while the eval runs
        evals.collect(wait=True)
        REPORT["weights_by_cuda_ipc"] = float(all(e._ipc for e in run.eval_engines))
        same = [concurrent.texts[k] == v for k, v in blocking.texts.items()]
        REPORT["identical_eval_texts_frac"] = sum(same) / len(same)
        REPORT["eval_wait_s"] = concurrent.scalars[5]["time/eval_wait_s"]
        REPORT["eval_s"] = concurrent.scalars[5]["time/eval_s"]
        assert len(same) == 48 and sum(same) / len(same) >= 0.8
        # the perturbed-after weights, evaluated blocking, give other samples nearly everywhere
        run.engine.load_weights(full_tensors(run.policy))
        later = RecordingLogger()
        LoopEvals(run, later).start(6)
        moved = [later.texts[(6, k[1])] != v for k, v in blocking.texts.items()]
        REPORT["changed_texts_frac_after_perturbing"] = sum(moved) / len(moved)
        assert sum(moved) / len(moved) >= 0.8
    finally:
        for proc in run.eval_engines:
            proc.close()
