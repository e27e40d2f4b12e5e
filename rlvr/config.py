"""Run configuration: one dataclass, mapped field by field onto argparse.

Defaults reproduce the published setup (Qwen2.5-0.5B-Instruct, 80 steps of 64 rollouts = 32 prompts
x 2 samples, 512 new tokens, lr 1e-6, one update per step, eval every 10 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlvr.objectives import OBJECTIVES
from rlvr.prompts import PROMPT_STYLES


def _opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse's keyword
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- what to train
    objective: str = _opt("NSR", "training objective", choices=OBJECTIVES)
    model_id: str = _opt("Qwen/Qwen2.5-0.5B-Instruct",
                         "HF hub id, local HF model directory, or a .gguf file")
    lambda_psr: float = _opt(0.1, "weight of correct samples in W_REINFORCE (REINFORCE uses 1)")
    prompt_style: str = _opt("default", "user prompt wording; 'paper' = the paper's exact sentence",
                             choices=tuple(PROMPT_STYLES))
    # --- rollouts
    max_tokens: int = _opt(512, "max new tokens per rollout")
    n_train_steps: int = _opt(80, "number of training steps (rollout batch + updates + sync)")
    rollout_batch_size: int = _opt(64, "samples per step (prompts per step x rollouts_per_prompt)")
    rollouts_per_prompt: int = _opt(2, "samples per prompt")
    temperature: float = _opt(1.0, "rollout sampling temperature (top-p 1, top-k off)")
    max_prompt_tokens: int = _opt(1024, "longer prompts are skipped and counted")
    # --- updates
    mini_batch_size: int | None = _opt(
        None, "samples per optimizer step (default: the rollout batch, one update per step; "
              "16 gives the paper's four off-policy updates)")
    micro_batch_size: int = _opt(16, "samples per forward/backward (memory only; accumulation is "
                                     "derived)")
    lr: float = _opt(1e-6, "AdamW learning rate (constant, no warm-up)")
    clip_range: float = _opt(0.2, "PPO clip epsilon")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    gradient_checkpointing: str = _opt("auto", "recompute activations in backward to save memory; "
                                               "auto = on for models of 1B parameters or more",
                                       choices=("auto", "true", "false"))
    # --- evaluation
    eval_every: int = _opt(10, "evaluate every N steps (also at step 0 and after the last step)")
    eval_n: int = _opt(4, "samples per eval problem (pass@k for k = 1, 2, 4, ... <= n)")
    eval_temperature: float = _opt(1.0, "eval sampling temperature; 0 = greedy with n = 1")
    eval_limit: int | None = _opt(None, "evaluate on a stratified seeded sample of this many test "
                                        "problems (default: the whole test subset)")
    eval_max_tokens: int | None = _opt(None, "max new tokens at eval (default: --max_tokens)")
    # --- engine and hardware
    backend: str = _opt("auto", "rollout engine: vllm when CUDA and vllm are present, else hf",
                        choices=("auto", "vllm", "hf"))
    gpu_mem_util: float = _opt(0.35, "share of GPU memory vLLM may take (weights + KV cache)")
    vllm_sleep: bool = _opt(False, "put vLLM to sleep during updates (frees its KV cache; for 3B)")
    vllm_max_num_seqs: int = _opt(512, "most sequences vLLM decodes at once (512 = its largest "
                                       "CUDA-graph batch; bigger batches run without graphs)")
    grader_workers: int | None = _opt(None, "math-verify worker processes (default: min(8, cpus))")
    grade_timeout_s: float = _opt(5.0, "per-sample grading time limit; a timeout counts as wrong")
    # --- data and outputs
    data_dir: str = _opt("data/math_subset", "output of data_prep.py (train.jsonl, test.jsonl)")
    output_dir: str = _opt("runs", "parent directory of run directories")
    exp_name: str | None = _opt(None, "run name (default: <model>_<objective>[_lam<l>]_s<seed>)")
    save_every: int = _opt(20, "checkpoint every N steps (and always at the end); 0 = end only")
    resume: bool = _opt(False, "continue the run in output_dir/exp_name from its last checkpoint")
    seed: int = _opt(42, "seed for data order, sampling and initialisation")
    n_eval_examples_logged: int = _opt(4, "eval responses shown as TensorBoard text per eval")
    logprob_gap_every: int = _opt(10, "every N steps (and step 1) also fetch the engine's sampling "
                                      "log-probs and log their gap to the trainer's; 0 = never")

    @property
    def prompts_per_step(self) -> int:
        return self.rollout_batch_size // self.rollouts_per_prompt

    @property
    def run_name(self) -> str:
        if self.exp_name:
            return self.exp_name
        short = Path(self.model_id.rstrip("/")).name.removesuffix(".gguf")
        lam = f"_lam{self.lambda_psr:g}" if self.objective == "W_REINFORCE" else ""
        return f"{short}_{self.objective}{lam}_s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def validate(self) -> None:
        """Raise ValueError with a one-line message for inconsistent settings."""
        mb = self.mini_batch_size or self.rollout_batch_size
        checks = [
            (self.rollout_batch_size % self.rollouts_per_prompt == 0,
             "--rollout_batch_size must be a multiple of --rollouts_per_prompt"),
            (self.rollout_batch_size % mb == 0,
             "--rollout_batch_size must be a multiple of --mini_batch_size"),
            (mb % self.micro_batch_size == 0 or self.micro_batch_size >= mb,
             "--mini_batch_size must be a multiple of --micro_batch_size"),
            (self.objective != "GRPO" or self.rollouts_per_prompt >= 2,
             "GRPO needs --rollouts_per_prompt >= 2"),
            (self.temperature > 0, "--temperature must be > 0 (log-probs are of the sampling "
                                   "distribution)"),
            (self.eval_temperature >= 0, "--eval_temperature must be >= 0"),
            (self.n_train_steps >= 0 and self.eval_every > 0, "steps must be positive"),
            (self.max_tokens > 0 and self.eval_n > 0, "--max_tokens and --eval_n must be > 0"),
            (0 < self.gpu_mem_util < 1, "--gpu_mem_util must be in (0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Settings a resumed run may change; anything else would make the continued run a different one.
RESUMABLE_FIELDS = {"n_train_steps", "eval_every", "eval_n", "eval_temperature", "eval_limit",
                    "eval_max_tokens", "save_every", "resume", "n_eval_examples_logged",
                    "grader_workers", "grade_timeout_s", "backend", "gpu_mem_util",
                    "vllm_sleep", "vllm_max_num_seqs", "output_dir",
                    "logprob_gap_every"}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="RL fine-tuning on MATH with NSR / PSR / W-REINFORCE (Zhu et al., 2025).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Config):
        kw = {"default": f.default, "help": f.metadata["help"]}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type in ("bool",):
            if f.name == "resume":
                kw["action"] = "store_true"
            else:
                kw.update(type=_parse_bool, metavar="{true,false}")
        elif f.type in ("int", "int | None"):
            kw["type"] = int
        elif f.type in ("float",):
            kw["type"] = float
        else:
            kw["type"] = str
        parser.add_argument(f"--{f.name}", **kw)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    cfg = Config(**vars(args))
    try:
        cfg.validate()
    except ValueError as e:
        build_parser().error(str(e))
    return cfg


def load_config(path: Path) -> Config:
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in data.items() if k in names})
