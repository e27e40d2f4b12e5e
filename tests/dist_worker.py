"""Runs of MATH_experiment's loop for tests/test_dist.py: under torchrun (several ranks) and in the
test's own process (one rank), on the same global batches.

    torchrun --nproc_per_node 2 tests/dist_worker.py MODEL DATA OUT CASE [CASE ...]

Rewards come from a deterministic stand-in for the verifier (a hash of the response text): a
random tiny model never writes a correct boxed answer, so the real grader would score every
sample 0 and PSR would train on nothing. The rollouts, advantages, update, sync, eval and
checkpoints are the product's own.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlvr import experiment  # noqa: E402
from rlvr.reward import GradeResult  # noqa: E402


class HashGrader:
    """Scores a response 1 when the CRC32 of its text is odd: about half of them, at random but
    the same for the same text on any rank."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def grade_batch(self, responses: list[str], golds: list[str]) -> GradeResult:
        return GradeResult(scores=[float(zlib.crc32(r.encode()) % 2) for r in responses])

    def close(self) -> None:
        pass


# 8 prompts x 2 samples a step; mini-batches of 4 samples, so PSR and NSR take ceil(kept / 4)
# optimizer steps over the global batch (the two ranks keeping different numbers); micro-batches
# of at most ~2 sequences, so the ranks run different numbers of them and pad with empty ones.
COMMON = ["--backend", "hf", "--rollout_batch_size", "16", "--rollouts_per_prompt", "2",
          "--max_tokens", "12", "--max_prompt_tokens", "400", "--mini_batch_size", "4",
          "--loss_agg", "paper", "--micro_batch_tokens", "700", "--lr", "1e-4",
          "--eval_every", "100", "--eval_limit", "3", "--eval_n", "2", "--save_every", "0",
          "--grader_workers", "1"]
CASES = {
    "PSR": ["--objective", "PSR", "--n_train_steps", "3"],
    "NSR": ["--objective", "NSR", "--n_train_steps", "3"],
    "W_REINFORCE": ["--objective", "W_REINFORCE", "--n_train_steps", "3"],
    # stopped after 2 steps: test_dist resumes it at another world size
    "resume": ["--objective", "W_REINFORCE", "--n_train_steps", "2"],
}


def args(case: str, model: str, data: str, out: str) -> list[str]:
    return [*COMMON, *CASES[case], "--model_id", model, "--data_dir", data, "--output_dir", out,
            "--exp_name", case]


def run(model: str, data: str, out: str, cases: list[str]) -> None:
    experiment.BatchGrader = HashGrader
    for case in cases:
        code = experiment.main(args(case, model, data, out))
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    run(*sys.argv[1:4], sys.argv[4:])
