"""The memory plan of a run: the model's shape and the card it runs on, the plan chosen for them
(rlvr/memory_plan.py does the arithmetic), the concurrent eval engine taken where it fits, and the
plan resolved into the settings the run loads its models with.

Computed from config.json alone, so `--dry_run` needs no weights.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlvr import dist
from rlvr.cli import fail
from rlvr.config import Config
from rlvr.logprobs import LOGIT_CHUNK_TOKENS
from rlvr.memory import (
    KNOWN_SHAPES,
    PlanError,
    Workload,
    model_shape_from_config,
)
from rlvr.memory_plan import MemoryPlan, plan_memory

# Without a GPU there is no card to plan for: the CPU fallback runs with these.
CPU_DEFAULTS = {"optim": "adamw", "gradient_checkpointing": False, "micro_batch_tokens": 16384}


def read_model_config(model_id: str) -> tuple[dict, str]:
    """The model's config.json as a dict, and where it came from; never loads weights.

    A hub id costs at most one bounded probe of the hub (rlvr.modeling.check_model_source):
    when the hub cannot give the file, a model of KNOWN_SHAPES falls back to its built-in copy
    at once, rather than after the hub client's retries.
    """
    path = Path(model_id).expanduser()
    if model_id.endswith(".gguf"):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return cfg.to_dict(), str(path)
    if path.is_dir():
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from rlvr.modeling import HUB_PROBE_TIMEOUT_S, ModelSourceError, check_model_source

    try:
        check_model_source(model_id)  # passes at once when the file is in the local cache
    except ModelSourceError:
        if model_id in KNOWN_SHAPES:  # offline: the public config of a model we know
            return KNOWN_SHAPES[model_id], f"built-in copy of {model_id}'s config.json"
        raise
    local = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(local, str):
        local = hf_hub_download(model_id, "config.json", etag_timeout=HUB_PROBE_TIMEOUT_S)
    return json.loads(Path(local).read_text()), f"hub:{model_id}"


def workload(cfg: Config, eval_problems: int, world_size: int = 1,
             fsdp: bool = False, eval_engine_seqs: int | None = None,
             eval_engines: int = 1) -> Workload:
    """What one rank needs at once: its engine's share of the rollouts and the eval (one engine
    per --rollout_tp ranks of a `world_size`-rank job), its policy state sharded under FSDP, and
    the engine processes: a concurrent eval engine, the rollout engine of --async_rollout."""
    eval_n = 1 if cfg.eval_temperature == 0 else cfg.eval_n
    engines = max(world_size // cfg.rollout_tp, 1)
    return Workload(rollout_seqs=-(-cfg.rollout_batch_size // engines),
                    max_prompt_tokens=cfg.max_prompt_tokens,
                    max_tokens=cfg.max_tokens, eval_seqs=-(-eval_problems // engines) * eval_n,
                    eval_max_tokens=cfg.eval_max_tokens or cfg.max_tokens,
                    max_num_seqs=cfg.vllm_max_num_seqs, reference_model=cfg.kl_coef > 0,
                    logit_chunk_tokens=LOGIT_CHUNK_TOKENS,
                    fsdp_shards=world_size if fsdp else None, rollout_tp=cfg.rollout_tp,
                    eval_engine_seqs=eval_engine_seqs, eval_engines=eval_engines,
                    async_rollout=cfg.async_rollout)


def card_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_ram_gib(limit_files: tuple[str, ...] = CGROUP_LIMITS) -> float:
    """This machine's RAM, or the container's memory limit where that is lower (cgroup v2/v1)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in limit_files:
        try:
            ram = min(ram, int(Path(path).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            pass
    return ram / 2**30


def _saved(cfg: Config) -> dict:
    path = cfg.run_dir / "config.json"
    return json.loads(path.read_text()) if cfg.resume and path.is_file() else {}


def saved_optimizer(cfg: Config) -> str | None:
    """On --resume, the optimizer the run's checkpoint was written by: a new plan must not pick
    another (its state would not load), whatever the card or the budget is now."""
    return (_saved(cfg).get("memory_plan") or {}).get("optim")


def saved_mode(cfg: Config) -> str | None:
    """On --resume, single, ddp or fsdp: the layout the run's checkpoints were written in."""
    return _saved(cfg).get("mode")


def plan_for(cfg: Config, eval_problems: int, fsdp: bool = False,
             eval_engine_seqs: int | None = None, eval_engines: int = 1) -> MemoryPlan:
    """The memory plan for one rank of this run on this card (or on --gpu_memory_gb), the
    policy sharded (FSDP) or not, evals on `eval_engines` concurrent engines of
    `eval_engine_seqs` sequences each or on the rollout engine (None); PlanError with the
    one-line reason (cause; fix) when there is none."""
    budget = cfg.gpu_memory_gb or card_gib()
    if budget is None:
        raise PlanError("no CUDA GPU here to plan for; pass --gpu_memory_gb (the card's memory "
                        "in GiB)")
    try:
        model_cfg, _ = read_model_config(cfg.model_id)
        shape = model_shape_from_config(model_cfg)
    except PlanError:
        raise
    except Exception as e:
        raise PlanError(f"cannot read the config.json of --model_id {cfg.model_id}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
    forced = {"true": True, "false": False}
    optim = saved_optimizer(cfg) or ("adamw" if fsdp else cfg.optim)
    wl = workload(cfg, eval_problems, dist.launched().size, fsdp, eval_engine_seqs, eval_engines)
    return plan_memory(
        shape, wl, budget, optim=optim,
        gradient_checkpointing=forced.get(str(cfg.gradient_checkpointing).lower(), "auto"),
        # one-step-off: the rollout engine generates while the update runs, so it never sleeps
        sleep=False if cfg.async_rollout else forced.get(str(cfg.vllm_sleep).lower(), "auto"),
        micro_batch_tokens=cfg.micro_batch_tokens, gpu_mem_util=cfg.gpu_mem_util,
        host_gib=cfg.host_memory_gb or host_ram_gib())


def eval_engine_choice(cfg: Config) -> str:
    """Whether the plan has a concurrent eval engine: "must" (--concurrent_eval true, and
    --async_rollout, whose rollout engine holds stale weights), "never" (false, or a torchrun
    job), "if free" (auto: where it fits without making the updates slower)."""
    if cfg.async_rollout or cfg.concurrent_eval == "true":
        return "must"
    if cfg.concurrent_eval == "false" or dist.launched().size > 1:
        return "never"
    return "if free"


# Concurrent eval engines decoding fewer sequences than these, all together and each, decode
# too little at once to be worth their memory.
MIN_EVAL_ENGINE_SEQS = 256
MIN_SEQS_PER_EVAL_ENGINE = 128


def _same_update(a: MemoryPlan, b: MemoryPlan) -> bool:
    return (a.optim, a.gradient_checkpointing, a.sleep, a.micro_batch_tokens) == (
        b.optim, b.gradient_checkpointing, b.sleep, b.micro_batch_tokens)


def eval_engine_options(cfg: Config) -> list[tuple[int, int]]:
    """(engines, sequences each) in the order the plan tries them: --eval_engines engines
    sharing --eval_max_num_seqs, then the same with half as many sequences (down to
    MIN_EVAL_ENGINE_SEQS in all and MIN_SEQS_PER_EVAL_ENGINE each), then one engine fewer, and
    so on down to one engine (always tried, with at least one sequence)."""
    options = []
    for engines in range(cfg.eval_engines, 0, -1):
        seqs = cfg.eval_max_num_seqs
        while engines == 1 or seqs // engines >= MIN_SEQS_PER_EVAL_ENGINE:
            options.append((engines, max(seqs // engines, 1)))
            if seqs // 2 < MIN_EVAL_ENGINE_SEQS:
                break
            seqs //= 2
    return options


def _with_eval_engine(cfg: Config, eval_problems: int, fsdp: bool) -> MemoryPlan:
    """The plan with the first of eval_engine_options that fits; auto takes concurrent eval
    engines only where the update keeps the choices it has without (no sleep, checkpointing or
    smaller micro-batches added for their room)."""
    choice = eval_engine_choice(cfg)
    if choice == "never":
        return plan_for(cfg, eval_problems, fsdp)
    alone = None if choice == "must" else plan_for(cfg, eval_problems, fsdp)
    error = None
    for engines, seqs in eval_engine_options(cfg):
        try:
            plan = plan_for(cfg, eval_problems, fsdp, seqs, engines)
            if alone is None or _same_update(plan, alone):
                return plan
        except PlanError as e:
            error = e
    if alone is None:
        raise error or PlanError("no room for the concurrent eval engine")
    print("note: a concurrent eval engine does not fit beside this run without slowing its "
          "updates: the evals run on the rollout engine, the trainer waiting", file=sys.stderr,
          flush=True)
    return alone


def choose_plan(cfg: Config, eval_problems: int) -> tuple[MemoryPlan, bool]:
    """This rank's plan and whether it shards the policy (FSDP): as --fsdp or the resumed run
    say, else replicated (DDP) where that fits and sharded where only that does (a job of
    several GPUs, exact AdamW), else PlanError with the replicated plan's one-line reason. The
    plan has a concurrent eval engine (plan.eval_engine_seqs) as eval_engine_choice says."""
    fsdp = cfg.fsdp or saved_mode(cfg) == "fsdp"
    may_shard = (not fsdp and saved_mode(cfg) is None and dist.launched().size > 1
                 and cfg.optim in ("auto", "adamw") and cfg.backend != "hf")
    try:
        return _with_eval_engine(cfg, eval_problems, fsdp), fsdp
    except PlanError:
        if may_shard:
            try:
                plan = plan_for(cfg, eval_problems, True)
            except PlanError:
                pass
            else:
                print("note: replicated weights, gradients and optimizer state do not fit one "
                      "GPU; sharding them over the job's GPUs (FSDP2)", flush=True)
                return plan, True
        raise


def chosen_plan(cfg: Config, eval_problems: int) -> tuple[MemoryPlan, bool]:
    """`choose_plan`, or its reason as a one-line refusal (exit status 2)."""
    try:
        return choose_plan(cfg, eval_problems)
    except PlanError as e:
        fail(str(e))


def eval_problem_count(cfg: Config) -> int:
    """How many eval problems the run will have, from the data file alone (for the plan)."""
    path = Path(cfg.data_dir) / "test.jsonl"
    n = sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 1250
    return min(n, cfg.eval_limit or n)


def dry_run(cfg: Config) -> int:
    if cfg.plan_json:
        print(json.dumps(plan_report(cfg)), flush=True)
        return 0
    plan, fsdp = chosen_plan(cfg, eval_problem_count(cfg))
    print(plan.format_table())
    if (size := dist.launched().size) > 1:
        layout = "sharded (fsdp)" if fsdp else "replicated (ddp)"
        print(f"(the plan of one rank of {size}; the policy {layout})")
    return 0


def plan_report(cfg: Config) -> dict:
    """`--dry_run --plan_json`: what run_study.py needs before it starts this run, found the way
    the run itself would find it. `plan` is None with no budget to plan for (no GPU and no
    --gpu_memory_gb), {"error": why} when the run cannot fit, else the plan as config.json
    records it plus "table" (the printed plan); `model_error` says why --model_id cannot load;
    `eval_problems` is how many problems each eval will have."""
    from rlvr.modeling import ModelSourceError, check_model_source

    try:
        check_model_source(cfg.model_id)
        model_error = None
    except ModelSourceError as e:
        model_error = str(e)
    plan = None
    if cfg.gpu_memory_gb is not None or card_gib() is not None:
        try:
            p, _ = choose_plan(cfg, eval_problem_count(cfg))
            plan = {**p.to_dict(), "table": p.format_table()}
        except PlanError as e:
            plan = {"error": str(e)}
    return {"config": cfg.to_json(), "plan": plan, "model_error": model_error,
            "eval_problems": eval_problem_count(cfg)}


@dataclass
class Resolved:
    """What the plan (GPU) or the CPU defaults decided, in the form the loaders take."""
    optim: str
    gradient_checkpointing: bool
    micro_batch_tokens: int
    sleep: bool = False
    kv_cache_bytes: int | None = None
    plan: dict | None = field(default=None)
    # micro-batches packed into one row (varlen attention, no padding): set by load_models
    packed: bool = False
    fsdp: bool = False  # the policy sharded over the job's GPUs (FSDP2), not replicated (DDP)
    # evals on engine processes of their own (rlvr/loop_evals.py), each decoding this many at
    # once with a KV cache of this many bytes
    eval_engine_seqs: int | None = None
    eval_kv_cache_bytes: int | None = None
    eval_engines: int = 1


def memory_fraction(plan: MemoryPlan, card: float, async_rollout: bool = False) -> float:
    """torch's per-process cap for a budget below the card. torch counts vLLM's weights and KV
    cache as allocated also while vLLM sleeps (their virtual addresses stay in its memory pool,
    only the physical pages go), so in sleep mode the cap adds them back: otherwise a 3B update
    under a 24 GiB budget was refused at 11.5 GiB of real use. The cap thus holds updates to the
    budget; while vLLM is awake it allows that much more, and the rollout phase is held to the
    budget by the plan's fixed KV cache size instead."""
    asleep = plan.rollout_gib["vllm_weights"] + plan.rollout_gib["kv_cache"] if plan.sleep else 0.0
    # what engine processes hold on the card is theirs, not this process's to allocate
    others = plan.rollout_gib.get("engine_processes", 0.0) + (
        plan.rollout_gib["vllm_weights"] + plan.rollout_gib["kv_cache"]
        + plan.rollout_gib["vllm_overhead"] if async_rollout else 0.0)
    return min((plan.budget_gib + asleep - others) / card, 1.0)


def resolve_memory(cfg: Config, device: torch.device, eval_problems: int) -> Resolved:
    if device.type != "cuda":
        gc = {"true": True}.get(str(cfg.gradient_checkpointing).lower(), False)
        optim = CPU_DEFAULTS["optim"] if cfg.optim == "auto" else cfg.optim
        must = eval_engine_choice(cfg) == "must"
        engines, seqs = eval_engine_options(cfg)[0]
        return Resolved(optim, gc, cfg.micro_batch_tokens or CPU_DEFAULTS["micro_batch_tokens"],
                        eval_engine_seqs=seqs if must else None,
                        eval_engines=engines if must else 1)
    plan, fsdp = chosen_plan(cfg, eval_problems)
    print(plan.format_table(), flush=True)
    budget = cfg.gpu_memory_gb
    if budget is not None and budget < card_gib():
        torch.cuda.set_per_process_memory_fraction(
            memory_fraction(plan, card_gib(), cfg.async_rollout))
    return Resolved(plan.optim, plan.gradient_checkpointing, plan.micro_batch_tokens,
                    plan.sleep, plan.kv_cache_bytes, plan.to_dict(), fsdp=fsdp,
                    eval_engine_seqs=plan.eval_engine_seqs,
                    eval_kv_cache_bytes=plan.eval_kv_cache_bytes, eval_engines=plan.eval_engines)


# ----------------------------------------------------------------------------- models and engine
