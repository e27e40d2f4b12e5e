"""Runs of MATH_experiment's loop for tests/test_dist.py: under torchrun (several ranks) and in the
test's own process (one rank), on the same global batches.

    torchrun --nproc_per_node 2 tests/dist_worker.py MODEL DATA OUT CASE [CASE ...]

Rewards come from a deterministic stand-in for the verifier (bench/hash_grader.py: a hash of the
response text), which also records every rank's training scores. The rollouts, advantages,
update, sync, eval and checkpoints are the product's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import hash_grader  # noqa: E402
from bench.hash_grader import HashGrader  # noqa: E402
from rlvr import experiment  # noqa: E402


def step_scores(out: Path, case: str, rank: int) -> list[list[float]]:
    """The training scores a rank recorded for `case`, one list per step."""
    return hash_grader.step_scores(Path(out) / f"scores_rank{rank}.jsonl", case)


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
    real, experiment.BatchGrader = experiment.BatchGrader, HashGrader
    Path(out).mkdir(parents=True, exist_ok=True)
    HashGrader.log = Path(out) / f"scores_rank{os.environ.get('RANK', '0')}.jsonl"
    try:
        for case in cases:
            if case == "fsdp":
                fsdp_case(model, out)
                continue
            HashGrader.case = case
            code = experiment.main(args(case, model, data, out))
            if code:
                raise SystemExit(code)
    finally:  # in the test's own process the other tests grade for real
        experiment.BatchGrader = real


# ---------------------------------------------------------------------------- FSDP2 on CPU

FSDP_STEPS = 2


def fsdp_batch():
    """A fixed global batch of 8 samples (4 groups of 2): the first half long, the second short,
    so the two ranks need different numbers of micro-batches; W_REINFORCE-style advantages."""
    import torch

    from rlvr.training import UpdateBatch

    g = torch.Generator().manual_seed(0)
    lens = [(30, 9), (28, 12), (25, 7), (33, 10), (6, 3), (5, 4), (7, 2), (4, 5)]
    prompts = [torch.randint(0, 250, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(0, 250, (r,), generator=g).tolist() for _, r in lens]
    correct = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    return UpdateBatch(prompts, responses, torch.where(correct > 0, 0.1, -1.0),
                       torch.ones(8, dtype=torch.bool))


def fsdp_settings():
    import torch

    from rlvr.training import UpdateSettings

    return UpdateSettings(temperature=1.0, clip_range=0.2, mini_batch_size=2, max_grad_norm=1.0,
                          pad_id=257, device=torch.device("cpu"), micro_batch_tokens=40,
                          entropy_coef=0.01, kl_coef=0.05)


def update_steps(trainer, optimizer, batch, reference) -> list[dict]:
    """FSDP_STEPS updates of `batch` (this rank's part of fsdp_batch) with four mini-batches."""
    import torch

    from rlvr.training import policy_update

    gen = torch.Generator().manual_seed(0)
    return [policy_update(trainer, optimizer, batch, fsdp_settings(), gen, reference)
            for _ in range(FSDP_STEPS)]


def fsdp_case(model: str, out: str) -> None:
    """The update, the sync's full tensors, a checkpoint and the final model with the policy
    (and the KL reference) sharded by FSDP2 over the job's ranks (gloo); rank 0 saves what the
    test compares with one process."""
    import torch

    from rlvr import dist, fsdp
    from rlvr.checkpoint import save_checkpoint, save_final_policy
    from rlvr.modeling import load_policy, load_tokenizer
    from rlvr.optimizers import make_optimizer
    from rlvr.training import UpdateBatch

    cpu = torch.device("cpu")
    dist.init("cpu")
    policy = load_policy(model, cpu, gradient_checkpointing=True)
    trainer = fsdp.shard(policy, cpu)
    reference = fsdp.shard(load_policy(model, cpu, False).requires_grad_(False), cpu)
    optimizer = make_optimizer(policy, 1e-3, 0.01)
    full = fsdp_batch()
    mine = UpdateBatch(dist.shard(full.prompts), dist.shard(full.responses),
                       torch.stack(dist.shard(full.advantages)), torch.stack(dist.shard(full.keep)))
    stats = update_steps(trainer, optimizer, mine, reference)
    weights = {name: t.clone() for name, t in fsdp.full_tensors(policy, torch.float32)}
    run_dir = Path(out) / "fsdp"
    save_checkpoint(run_dir, FSDP_STEPS, policy, optimizer, {"world_size": dist.world().size})
    save_final_policy(run_dir, policy, load_tokenizer(model))
    if dist.is_main():
        torch.save({"stats": stats, "weights": weights}, Path(out) / "fsdp_result.pt")


if __name__ == "__main__":
    run(*sys.argv[1:4], sys.argv[4:])
