"""Run configuration: one dataclass, presets as data, mapped field by field onto argparse.

A setting's value comes from, later winning: the dataclass default (which is the `seed` preset),
the chosen `--preset`'s table, then the flags given on the command line. On `--resume` the run's
saved config.json replaces the first two, so only the flags that should change need retyping, and
only settings that do not change what the run is (`RESUMABLE_FIELDS`) may change.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlvr.choices import LOSS_AGGREGATIONS, OBJECTIVES, OPTIM_CHOICES, ROLLOUT_IS_MODES
from rlvr.cli import ArgumentParser, fail
from rlvr.prompts import PROMPT_STYLES


def _opt(default, help: str, **kw):  # noqa: A002 - mirrors argparse's keyword
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    preset: str = _opt("seed", "settings table to start from: 'seed' = the published small-scale "
                       "study (these defaults), 'paper' = the paper's own run (see README)",
                       choices=("seed", "paper"))
    # --- what to train
    objective: str = _opt("NSR", "training objective", choices=OBJECTIVES)
    model_id: str = _opt("Qwen/Qwen2.5-0.5B-Instruct",
                         "HF hub id, local HF model directory, or a .gguf file")
    lambda_psr: float = _opt(0.1, "weight of correct samples in W_REINFORCE (REINFORCE uses 1)")
    prompt_style: str = _opt("paper", "user prompt wording; 'paper' is the paper's exact sentence",
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
        None, "samples per optimizer step; the default, the whole rollout batch, gives one update "
              "per step. PSR/NSR split their kept samples (see --loss_agg)")
    loss_agg: str = _opt("paper", "loss normaliser. paper: keep the objective's samples, split "
                         "them into mini-batches, token mean x kept/mini_batch_size (the paper's "
                         "code); batch_token_mean: split all samples, divide by every response "
                         "token of the mini-batch (grad PSR + grad NSR = grad REINFORCE)",
                         choices=LOSS_AGGREGATIONS)
    lr: float = _opt(1e-6, "AdamW learning rate (constant, no warm-up)")
    adam_betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas", nargs=2)
    clip_range: float = _opt(0.2, "PPO clip epsilon")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    entropy_coef: float = _opt(0.0, "entropy bonus (token mean); the paper's config has 0.001")
    kl_coef: float = _opt(0.0, "k3 (low-variance) KL to a frozen copy of the initial policy; the "
                               "paper uses 1e-3 for its GRPO/PPO baselines, 0 for PSR/NSR")
    rollout_is: str = _opt("none", "correct the sampler/trainer mismatch: tis = token-level "
                           "truncated IS weight min(pi_old/pi_sampler, cap); mis = sequence-level "
                           "IS weight, sequences over the cap masked out", choices=ROLLOUT_IS_MODES)
    rollout_is_cap: float = _opt(2.0, "cap of the importance-sampling weight (--rollout_is)")
    optim: str = _opt("auto", "optimizer: adamw (fp32 master weights, exact), adamw_kahan (bf16 "
                              "weights, Kahan-compensated), adamw_8bit (8-bit state), "
                              "adamw_offload (state on the CPU), adamw_kahan_offload (bf16 "
                              "weights on the GPU, Kahan state on the CPU); auto = exact where it "
                              "fits the memory budget",
                      choices=OPTIM_CHOICES)
    # --- GPU memory (see rlvr/memory.py)
    gpu_memory_gb: float | None = _opt(None, "GPU memory budget in GiB (default: the whole card); "
                                             "the memory plan must fit it")
    host_memory_gb: float | None = _opt(None, "host RAM in GiB, of which optimizer state "
                                              "offloaded to the CPU may take three quarters "
                                              "(default: this machine's or its container's "
                                              "limit; give the GPU machine's for a --dry_run "
                                              "elsewhere)")
    micro_batch_tokens: int | None = _opt(None, "padded tokens per forward/backward (memory only; "
                                                "default: from the memory plan)")
    gradient_checkpointing: str = _opt("auto", "recompute activations in backward; auto = as the "
                                               "memory plan decides", choices=("auto", "true",
                                                                               "false"))
    vllm_sleep: str = _opt("auto", "put vLLM to sleep (level 2) while the policy trains; auto = "
                                   "when the memory plan needs the room",
                           choices=("auto", "true", "false"))
    gpu_mem_util: float | None = _opt(None, "expert override: share of the card for vLLM's weights "
                                            "+ KV cache, instead of the plan's KV size")
    compile: bool = _opt(False, "torch.compile the decoder layers and the LM-head loss (GPU only): "
                                "faster updates after a compile at start, so it pays on long runs "
                                "(docs/PERFORMANCE.md)")
    dry_run: bool = _opt(False, "print the memory plan and exit (reads only the model's "
                                "config.json)")
    # --- several GPUs (torchrun; see README "Several GPUs and nodes")
    fsdp: bool = _opt(False, "shard the policy's weights, gradients and AdamW state over the "
                             "job's GPUs (FSDP2) instead of replicating them on each (DDP); the "
                             "memory plan also picks it when replicated state does not fit "
                             "(torchrun, vLLM and --optim adamw only)")
    rollout_tp: int = _opt(1, "GPUs that share one vLLM engine (tensor parallel) in a torchrun "
                              "job, for a model whose rollouts do not fit one card; must divide "
                              "the GPUs per node")
    plan_json: bool = _opt(False, "with --dry_run: print one JSON object instead of the table: "
                                  "config (the resolved settings), plan (the memory plan and its "
                                  "printed table; null without a GPU or --gpu_memory_gb, "
                                  "{\"error\": ...} when it cannot fit), model_error (why "
                                  "--model_id cannot load, or null), eval_problems; bad flags "
                                  "still exit 2. "
                                  "run_study.py asks this before it starts a study")
    # --- evaluation
    eval_every: int = _opt(10, "evaluate every N steps (also at step 0 and after the last step)")
    eval_n: int = _opt(4, "samples per eval problem (pass@k for k = 1, 2, 4, ... <= n)")
    eval_temperature: float = _opt(1.0, "eval sampling temperature; 0 = greedy (needs --eval_n 1)")
    eval_top_p: float = _opt(1.0, "eval nucleus sampling top-p")
    eval_limit: int | None = _opt(None, "evaluate on a stratified seeded sample of this many test "
                                        "problems (default: the whole test subset)")
    eval_max_tokens: int | None = _opt(None, "max new tokens at eval (default: --max_tokens)")
    # --- engine
    backend: str = _opt("auto", "rollout engine: vllm when CUDA and vllm are present, else hf",
                        choices=("auto", "vllm", "hf"))
    vllm_max_num_seqs: int = _opt(512, "most sequences vLLM decodes at once (512 = its largest "
                                       "CUDA-graph batch; bigger batches run without graphs)")
    concurrent_eval: str = _opt("auto", "run the in-loop evals on a second engine in a process of "
                                        "its own, on a copy of the step's weights, while training "
                                        "goes on (the same records as a blocking eval); auto = "
                                        "on a GPU with vLLM, one process, where the memory plan "
                                        "fits the second engine", choices=("auto", "true", "false"))
    eval_max_num_seqs: int = _opt(1024, "most sequences the concurrent eval engines decode at "
                                        "once, all together (their KV caches and CUDA graphs "
                                        "are sized for their shares)")
    eval_engines: int = _opt(2, "concurrent eval engines, each in a process of its own "
                                "evaluating a contiguous share of the problems: one vLLM "
                                "engine's per-step CPU work, not the GPU, bounds an eval's "
                                "speed; the memory plan takes fewer where they do not fit")
    async_rollout: bool = _opt(False, "one-step-off-policy rollouts: the rollout engine (in a "
                                      "process of its own) generates step t+1's batch with the "
                                      "weights of step t-1 while step t's update runs, so every "
                                      "step after the first trains on samples one update stale; "
                                      "turns on --rollout_is tis unless --rollout_is is given "
                                      "(README: what it changes)")
    grader_workers: int | None = _opt(None, "math-verify worker processes (default: min(8, cpus))")
    grade_timeout_s: float = _opt(5.0, "per-sample grading time limit; a timeout counts as wrong")
    # --- data and outputs
    data_dir: str = _opt("data/math_subset", "output of data_prep.py (train.jsonl, test.jsonl)")
    output_dir: str = _opt("runs", "parent directory of run directories")
    exp_name: str | None = _opt(None, "run name (default: <model>_<objective>[_lam<l>]_s<seed>)")
    save_every: int = _opt(20, "checkpoint every N steps (and always at the end); 0 = end only")
    resume: bool = _opt(False, "continue the run in output_dir/exp_name from its last checkpoint, "
                               "with its saved settings (flags given now override resumable ones)")
    seed: int = _opt(42, "seed for data order, sampling and initialisation")
    n_eval_examples_logged: int = _opt(4, "eval responses shown as TensorBoard text per eval")
    logprob_gap_every: int = _opt(10, "every N steps (and step 1) also fetch the engine's sampling "
                                      "log-probs and log their gap to the trainer's; 0 = never "
                                      "(every step with --rollout_is)")
    debug: bool = _opt(False, "keep third-party progress bars and warnings in the log")
    # --- labels (recorded in config.json; they never change what the run does)
    study: str | None = _opt(None, "name of the study this run belongs to (run_study.py sets it)")
    study_axes: dict | None = _opt(None, "the run's values of the study's axes, a JSON object, "
                                         "e.g. '{\"objective\": \"NSR\", \"seed\": 1}' "
                                         "(run_study.py sets it)")

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

    @property
    def mini_batch(self) -> int:
        return self.mini_batch_size or self.rollout_batch_size

    def validate(self) -> str | None:
        """The first inconsistent or out-of-range setting, as a one-line message; None if fine."""
        positive_ints = ("max_tokens", "rollout_batch_size", "rollouts_per_prompt",
                         "eval_max_num_seqs", "eval_engines",
                         "max_prompt_tokens", "eval_every", "eval_n", "vllm_max_num_seqs",
                         "rollout_tp",
                         "mini_batch_size", "micro_batch_tokens", "eval_limit", "eval_max_tokens",
                         "grader_workers")
        for name in positive_ints:
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"--{name} must be >= 1, got {value}"
        for name in ("n_train_steps", "save_every", "logprob_gap_every", "n_eval_examples_logged",
                     "weight_decay", "entropy_coef", "kl_coef", "lambda_psr"):
            if getattr(self, name) < 0:
                return f"--{name} must be >= 0, got {getattr(self, name)}"
        for name in ("lr", "clip_range", "max_grad_norm", "grade_timeout_s", "temperature"):
            if not getattr(self, name) > 0:
                return f"--{name} must be > 0, got {getattr(self, name)}"
        checks = [
            (self.rollout_batch_size % self.rollouts_per_prompt == 0,
             "--rollout_batch_size must be a multiple of --rollouts_per_prompt"),
            (self.rollout_batch_size % self.mini_batch == 0,
             "--rollout_batch_size must be a multiple of --mini_batch_size"),
            (self.objective != "GRPO" or self.rollouts_per_prompt >= 2,
             "GRPO needs --rollouts_per_prompt >= 2"),
            (self.eval_temperature >= 0, "--eval_temperature must be >= 0"),
            (self.eval_temperature > 0 or self.eval_n == 1,
             f"--eval_temperature 0 is greedy, one sample per problem, but --eval_n is "
             f"{self.eval_n}; pass --eval_n 1, or an --eval_temperature > 0"),
            (0 < self.eval_top_p <= 1, "--eval_top_p must be in (0, 1]"),
            (all(0 <= b < 1 for b in self.adam_betas), "--adam_betas must be in [0, 1)"),
            (self.rollout_is_cap > 1, "--rollout_is_cap must be > 1"),
            (self.gpu_mem_util is None or 0 < self.gpu_mem_util < 1,
             "--gpu_mem_util must be in (0, 1)"),
            (self.gpu_memory_gb is None or self.gpu_memory_gb > 0, "--gpu_memory_gb must be > 0"),
            (self.host_memory_gb is None or self.host_memory_gb > 0,
             "--host_memory_gb must be > 0"),
            (not self.fsdp or self.backend != "hf",
             "--fsdp needs the vLLM engine: the HF engine samples with the policy's own "
             "weights, which FSDP shards"),
            (self.rollout_tp == 1 or self.backend != "hf",
             "--rollout_tp needs the vLLM engine (--backend vllm or auto)"),
            (not self.fsdp or self.optim in ("auto", "adamw"),
             f"--fsdp shards exact AdamW only (--optim adamw or auto); --optim {self.optim} "
             "keeps optimizer state FSDP does not shard"),
            (self.dry_run or not self.plan_json, "--plan_json goes with --dry_run"),
            (not (self.async_rollout and self.concurrent_eval == "false"),
             "--async_rollout evaluates on an eval engine of its own (its rollout engine holds "
             "the weights one update behind and is busy with the next batch): drop "
             "--concurrent_eval false"),
        ]
        for ok, msg in checks:
            if not ok:
                return msg
        if self.backend == "vllm" and not self.dry_run:
            return _vllm_missing()
        return None

    def launch_problem(self, world_size: int, gpus_per_node: int, torchrun: bool,
                       cuda: bool) -> str | None:
        """What makes these settings unable to run in this launch (one line), or None: a job of
        `world_size` ranks with `gpus_per_node` per node (torchrun's WORLD_SIZE and
        LOCAL_WORLD_SIZE; 1 and 1 for a plain process)."""
        tp = self.rollout_tp
        if (self.fsdp or tp > 1) and not cuda:
            flag = "--fsdp" if self.fsdp else "--rollout_tp"
            return f"{flag} needs CUDA GPUs (and vLLM for the rollouts); this machine has none"
        if (self.fsdp or tp > 1) and not torchrun:
            flag = "--fsdp" if self.fsdp else "--rollout_tp"
            return (f"{flag} runs under torchrun: torchrun --nproc_per_node N MATH_experiment.py "
                    "... (N = 1 for one GPU)")
        if world_size % tp or gpus_per_node % tp:
            return (f"--rollout_tp {tp} must divide the GPUs: {world_size} in the job, "
                    f"{gpus_per_node} per node (a tensor-parallel engine stays on one node)")
        if (self.async_rollout or self.concurrent_eval == "true") and world_size > 1:
            flag = "--async_rollout" if self.async_rollout else "--concurrent_eval true"
            return f"{flag} runs in one process (one GPU); leave it out under torchrun"
        if self.prompts_per_step % world_size:
            return (f"{self.prompts_per_step} prompts per step (--rollout_batch_size "
                    f"{self.rollout_batch_size} / --rollouts_per_prompt "
                    f"{self.rollouts_per_prompt}) do not split evenly over the job's "
                    f"{world_size} ranks: make it a multiple of {world_size}")
        return None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _vllm_missing() -> str | None:
    """Why --backend vllm cannot run here, found without importing vllm or initialising CUDA."""
    if importlib.util.find_spec("vllm") is None:
        return "--backend vllm needs the vllm package (pip install -r requirements.txt)"
    import torch

    if not torch.cuda.is_available():
        return "--backend vllm needs a CUDA GPU; use --backend hf (or auto) on this machine"
    return None


# The `paper` preset: run_qwen2.5-math-7b_psr_nsr.sh of the paper's repo (a verl fork) and the
# verl defaults it inherits. Only the settings that differ from the seed preset are listed.
PRESETS: dict[str, dict] = {
    "seed": {},
    "paper": {
        "rollout_batch_size": 8192,   # 1,024 prompts x 8 rollouts
        "rollouts_per_prompt": 8,
        "mini_batch_size": 2048,      # ppo_mini_batch_size 256 prompts x 8: 4 updates per step
        "max_tokens": 3072,
        "n_train_steps": 140,         # 20 epochs x 7 steps of the 7,500-problem MATH train split
        "entropy_coef": 0.001,        # ppo_trainer.yaml's entropy_coeff, never overridden there
        "data_dir": "data/math_full",  # python data_prep.py --fraction 1.0 --output_dir ...
        "eval_every": 7,              # test_freq 7 (once an epoch)
        "eval_temperature": 0.0,      # its in-loop validation is greedy
        "eval_n": 1,                  # (so one sample per problem)
        "eval_max_tokens": 3072,
    },
}

# Settings a resumed run may change; anything else would make the continued run a different one.
RESUMABLE_FIELDS = {"n_train_steps", "eval_every", "eval_n", "eval_temperature", "eval_top_p",
                    "eval_limit", "eval_max_tokens", "save_every", "resume",
                    "n_eval_examples_logged", "grader_workers", "grade_timeout_s", "backend",
                    "gpu_mem_util", "vllm_sleep", "vllm_max_num_seqs", "output_dir",
                    "logprob_gap_every", "gpu_memory_gb", "host_memory_gb", "micro_batch_tokens",
                    "gradient_checkpointing", "dry_run", "debug", "compile", "rollout_tp",
                    "plan_json", "study", "study_axes", "concurrent_eval", "eval_max_num_seqs",
                    "eval_engines"}


def _help_text(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.default is not None and f.type != "bool":
        default = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        text += f" (default: {default}"
        if f.name in PRESETS["paper"]:
            text += f"; paper preset: {PRESETS['paper'][f.name]}"
        text += ")"
    elif f.name in PRESETS["paper"]:
        text += f" (paper preset: {PRESETS['paper'][f.name]})"
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """Flags only: nothing is filled in unless given, so presets and resumes can tell."""
    parser = ArgumentParser(
        prog="MATH_experiment.py",
        description="RL fine-tuning on MATH with NSR / PSR / W-REINFORCE (Zhu et al., 2025).",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(Config):
        kw: dict = {"help": _help_text(f)}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type == "bool":
            kw["action"] = "store_true"
        elif f.type == "tuple[float, float]":
            kw.update(type=float, nargs=f.metadata["nargs"], metavar=("B1", "B2"))
        elif f.type in ("int", "int | None"):
            kw["type"] = int
        elif f.type in ("float", "float | None"):
            kw["type"] = float
        elif f.type == "dict | None":
            kw["type"] = _json_object
        else:
            kw["type"] = str
        parser.add_argument(f"--{f.name}", **kw)
    return parser


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _coerce(values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(Config)}
    out = {k: v for k, v in values.items() if k in names}
    if "adam_betas" in out:
        out["adam_betas"] = tuple(out["adam_betas"])
    return out


def resolve(explicit: dict, saved: dict | None = None) -> Config:
    """The Config that `explicit` flags give on top of a preset, or on top of a saved run."""
    if saved is None:
        preset = explicit.get("preset", "seed")
        values = {**PRESETS[preset], **_coerce(explicit)}
        if values.get("async_rollout") and "rollout_is" not in values:
            # stale samples uncorrected are reported to make runs collapse
            values["rollout_is"] = "tis"
        return Config(**values)
    fixed = [f.name for f in dataclasses.fields(Config) if f.name not in RESUMABLE_FIELDS]
    if missing := [k for k in fixed if k not in saved]:
        # today's defaults would silently stand in for settings the run never recorded
        raise ValueError("--resume: this run's config.json was written by an older version "
                         f"(no {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                         "start a new run")
    base = Config(**_coerce(saved))
    given = _coerce(explicit)
    if given.get("exp_name") == base.run_name:
        given.pop("exp_name")  # the name the run was derived to have, given explicitly
    changed = [k for k, v in given.items() if k not in RESUMABLE_FIELDS and v != getattr(base, k)]
    if changed:
        raise ValueError("--resume continues a run with its saved settings; these cannot change: "
                         + ", ".join(f"--{k} {getattr(base, k)!r} -> {explicit[k]!r}"
                                     for k in changed))
    # switches that describe this invocation, not the run: off unless given now
    given.setdefault("debug", False)
    given.setdefault("dry_run", False)
    given.setdefault("compile", False)
    given.setdefault("plan_json", False)
    return dataclasses.replace(base, **{k: v for k, v in given.items() if k in RESUMABLE_FIELDS})


def parse_config(argv: list[str] | None = None) -> Config:
    explicit = vars(build_parser().parse_args(argv))
    saved = None
    if explicit.get("resume"):
        run_dir = resolve({k: v for k, v in explicit.items() if k != "resume"}).run_dir
        if (run_dir / "config.json").is_file():
            try:
                saved = json.loads((run_dir / "config.json").read_text())
            except json.JSONDecodeError as e:
                fail(f"cannot resume: {run_dir / 'config.json'} is not valid JSON ({e.msg})")
    try:
        cfg = resolve(explicit, saved)
    except ValueError as e:
        fail(str(e))
    if (msg := cfg.validate()) is not None:
        fail(msg)
    return cfg

