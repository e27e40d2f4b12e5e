"""Everything a run needs before its first step: inputs checked, memory planned, models loaded.

Order matters and is kept here in one place: every check that can fail on bad input runs before
anything is written or loaded; the memory plan is computed from config.json alone (so `--dry_run`
needs no weights); vLLM starts before the optimizer state is allocated (its start-up activations
are handed back first) and sleeps while the state is made (see load_models).
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, NoReturn

import numpy as np
import torch

from rlvr import dist
from rlvr.attention import enable_packed_attention
from rlvr.cli import fail
from rlvr.config import RESUMABLE_FIELDS, Config
from rlvr.data import DataError, load_subset, stratified_subset
from rlvr.logprobs import LOGIT_CHUNK_TOKENS
from rlvr.memory import (
    KNOWN_SHAPES,
    MIN_HEADROOM_SHARE,
    PlanError,
    Workload,
    model_shape_from_config,
)
from rlvr.memory_plan import MemoryPlan, plan_memory
from rlvr.rollout import RolloutEngine
from rlvr.subset import build_default_subset
from rlvr.tracking import provenance

# The eval sample must not depend on --seed: runs of several seeds are compared on one problem set.
EVAL_SAMPLE_SEED = 0
# Without a GPU there is no card to plan for: the CPU fallback runs with these.
CPU_DEFAULTS = {"optim": "adamw", "gradient_checkpointing": False, "micro_batch_tokens": 16384}


def select_eval_rows(rows: list[dict], limit: int | None,
                     seed: int = EVAL_SAMPLE_SEED) -> list[dict]:
    """The whole test subset, or a seeded sample of `limit` problems stratified like it."""
    if limit is None or limit >= len(rows):
        return rows
    return stratified_subset(rows, limit / len(rows), seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- config.json


def write_config(cfg: Config, device: torch.device, step: int, plan: dict | None,
                 launch: dict | None = None) -> None:
    """config.json: the settings in force now, the memory plan, the launch (`world_size` and
    `mode`: single, a plain process; ddp, replicated under torchrun; fsdp, sharded), and how the
    run got here.

    A resume keeps the original provenance, appends its own (with its launch) under "resumes",
    and records under "settings_history" which resumable settings changed from which step, so
    the file always says what steps 0..N-1 ran with.
    """
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.json"
    now = cfg.to_json()
    launch = launch or {"world_size": 1, "mode": "single"}
    data = {**now, "memory_plan": plan, **launch, "provenance": provenance(device),
            "settings_history": [{"from_step": 0, "settings": now}]}
    if cfg.resume and path.exists():
        old = json.loads(path.read_text())
        changed = {k: now[k] for k in sorted(RESUMABLE_FIELDS)
                   if k in old and old[k] != now[k] and k != "resume"}
        history = old.get("settings_history") or [
            {"from_step": 0, "settings": {k: old[k] for k in now if k in old}}]
        if changed:
            history.append({"from_step": step, "changed": changed})
        data.update(provenance=old.get("provenance", data["provenance"]),
                    resumes=old.get("resumes", []) + [{**provenance(device), **launch}],
                    settings_history=history)
    tmp = cfg.run_dir / "config.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The train and test rows of --data_dir; a default --data_dir that is missing is built
    first (data_prep.py's code, from the hub). A one-line exit on anything unusable."""
    try:
        build_default_subset(cfg.data_dir)
        return load_subset(cfg.data_dir, "train"), load_subset(cfg.data_dir, "test")
    except DataError as e:
        fail(str(e))


# ----------------------------------------------------------------------------- the memory plan


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
             fsdp: bool = False, eval_engine_seqs: int | None = None) -> Workload:
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
                    eval_engine_seqs=eval_engine_seqs,
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
             eval_engine_seqs: int | None = None) -> MemoryPlan:
    """The memory plan for one rank of this run on this card (or on --gpu_memory_gb), the
    policy sharded (FSDP) or not, evals on a concurrent engine or not; PlanError with the
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
    wl = workload(cfg, eval_problems, dist.launched().size, fsdp, eval_engine_seqs)
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


# An eval engine of fewer sequences decodes too little at once to be worth its memory.
MIN_EVAL_ENGINE_SEQS = 256


def _same_update(a: MemoryPlan, b: MemoryPlan) -> bool:
    return (a.optim, a.gradient_checkpointing, a.sleep, a.micro_batch_tokens) == (
        b.optim, b.gradient_checkpointing, b.sleep, b.micro_batch_tokens)


def _with_eval_engine(cfg: Config, eval_problems: int, fsdp: bool) -> MemoryPlan:
    """The plan with a concurrent eval engine of --eval_max_num_seqs sequences, else of half as
    many (down to MIN_EVAL_ENGINE_SEQS); auto takes one only where the update keeps the choices
    it has without (no sleep, checkpointing or smaller micro-batches added for its room)."""
    choice = eval_engine_choice(cfg)
    if choice == "never":
        return plan_for(cfg, eval_problems, fsdp)
    alone = None if choice == "must" else plan_for(cfg, eval_problems, fsdp)
    seqs, error = cfg.eval_max_num_seqs, None
    while True:
        try:
            plan = plan_for(cfg, eval_problems, fsdp, seqs)
            if alone is None or _same_update(plan, alone):
                return plan
        except PlanError as e:
            error = e
        if seqs // 2 < MIN_EVAL_ENGINE_SEQS:
            break
        seqs //= 2
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
    records it plus "table" (the printed plan); `min_budget_gib` is the smallest
    budget under which this plan still fits; `model_error` says why --model_id cannot load;
    `eval_problems` is how many problems each eval will have."""
    from rlvr.modeling import ModelSourceError, check_model_source

    try:
        check_model_source(cfg.model_id)
        model_error = None
    except ModelSourceError as e:
        model_error = str(e)
    plan, min_budget = None, None
    if cfg.gpu_memory_gb is not None or card_gib() is not None:
        try:
            p, _ = choose_plan(cfg, eval_problem_count(cfg))
            plan = {**p.to_dict(), "table": p.format_table()}
            min_budget = p.planned_peak_gib / (1 - MIN_HEADROOM_SHARE)
        except PlanError as e:
            plan = {"error": str(e)}
    return {"config": cfg.to_json(), "plan": plan, "min_budget_gib": min_budget,
            "model_error": model_error, "eval_problems": eval_problem_count(cfg)}


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
    # evals on an engine process of their own (rlvr/loop_evals.py) decoding this many at once
    eval_engine_seqs: int | None = None
    eval_kv_cache_bytes: int | None = None


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
        return Resolved(optim, gc, cfg.micro_batch_tokens or CPU_DEFAULTS["micro_batch_tokens"],
                        eval_engine_seqs=(cfg.eval_max_num_seqs
                                          if eval_engine_choice(cfg) == "must" else None))
    plan, fsdp = chosen_plan(cfg, eval_problems)
    print(plan.format_table(), flush=True)
    budget = cfg.gpu_memory_gb
    if budget is not None and budget < card_gib():
        torch.cuda.set_per_process_memory_fraction(
            memory_fraction(plan, card_gib(), cfg.async_rollout))
    return Resolved(plan.optim, plan.gradient_checkpointing, plan.micro_batch_tokens,
                    plan.sleep, plan.kv_cache_bytes, plan.to_dict(), fsdp=fsdp,
                    eval_engine_seqs=plan.eval_engine_seqs,
                    eval_kv_cache_bytes=plan.eval_kv_cache_bytes)


# ----------------------------------------------------------------------------- models and engine


def build_engine(cfg: Config, mem: Resolved, policy, tokenizer, model_dir: str, eos_ids):
    """The run's rollout engine (engines.make_engine) as the plan sized it; in a torchrun job one
    per rank (or per --rollout_tp ranks), seeded by the base seed + its data-parallel rank."""
    from rlvr.engines import make_engine

    w = dist.world()
    return make_engine(
        cfg.backend, model_dir, tokenizer, eos_ids, policy=policy,
        seed=cfg.seed + w.rank // cfg.rollout_tp, max_num_seqs=cfg.vllm_max_num_seqs,
        max_model_len=cfg.max_prompt_tokens + max(cfg.max_tokens, cfg.eval_max_tokens or 0),
        sleep_mode=mem.sleep, kv_cache_bytes=None if cfg.gpu_mem_util else mem.kv_cache_bytes,
        # the plan gave vLLM gpu_mem_util x the budget; vLLM takes its share of the whole card
        gpu_mem_util=mem.plan["vllm_share_gib"] / card_gib() if cfg.gpu_mem_util else None,
        tensor_parallel=cfg.rollout_tp, distributed=dist.under_torchrun())


def compile_policy(policy, device: torch.device, sharded: bool = False) -> None:
    """--compile: regional compilation of the layers plus the LM-head loss; compiling happens
    in the first update."""
    if device.type != "cuda" or sharded:
        why = ("is not applied to FSDP's sharded units (not verified there)" if sharded
               else "applies on a CUDA GPU only")
        print(f"note: --compile {why}; running eager", flush=True)
        return
    from rlvr.attention import compile_decoder_layers
    from rlvr.logprobs import compile_logit_head

    compile_decoder_layers(policy)
    compile_logit_head()


def start_engine_process(cfg: Config, mem: Resolved, model_dir: str, *, evals: bool):
    """An engine in a process of its own (rlvr/engine_process.py) as the plan sized it: the
    concurrent eval engine (with a grader), or the rollout engine of --async_rollout."""
    from rlvr.engine_process import EngineProcess, EngineSpec

    longest = (cfg.eval_max_tokens or cfg.max_tokens if evals
               else max(cfg.max_tokens, cfg.eval_max_tokens or 0))
    return EngineProcess(EngineSpec(
        backend=cfg.backend, model_dir=model_dir, max_model_len=cfg.max_prompt_tokens + longest,
        seed=cfg.seed, max_num_seqs=mem.eval_engine_seqs if evals else cfg.vllm_max_num_seqs,
        kv_cache_bytes=mem.eval_kv_cache_bytes if evals else mem.kv_cache_bytes,
        grader=evals, grader_workers=cfg.grader_workers, grade_timeout_s=cfg.grade_timeout_s))


class Models(NamedTuple):
    tokenizer: object
    policy: torch.nn.Module        # the HF model: the HF engine, checkpoints, the sync's names
    trainer: torch.nn.Module       # PolicyLogprobs over it (in DDP, or FSDP2's root unit)
    optimizer: torch.optim.Optimizer
    engine: RolloutEngine          # in this process, or (--async_rollout) an engine process
    reference: torch.nn.Module | None  # PolicyLogprobs of the frozen initial policy (--kl_coef)
    eval_engine: object = None     # the concurrent eval's engine process (rlvr/loop_evals.py)


def _trainer(policy: torch.nn.Module, device: torch.device, sharded: bool,
             dtype: torch.dtype) -> torch.nn.Module:
    """The update's module: sharded over the job (FSDP2); or replicated, in DDP under torchrun
    when it has gradients to synchronise."""
    from rlvr.logprobs import PolicyLogprobs

    if sharded:
        from rlvr.fsdp import shard

        return shard(policy, device, dtype)
    if not any(p.requires_grad for p in policy.parameters()):
        return PolicyLogprobs(policy)
    return dist.data_parallel(PolicyLogprobs(policy), device)


def _cannot_load(cfg: Config, e: Exception) -> NoReturn:
    """A bad path or hub id, an unsupported model: one line."""
    fail(f"cannot load --model_id {cfg.model_id}: {str(e).strip().splitlines()[0]}; pass a "
         "hub id, a local model directory or a .gguf file")


def load_models(cfg: Config, device: torch.device, mem: Resolved) -> Models:
    """Tokenizer, policy (in the dtype its optimizer keeps), the frozen reference policy for
    --kl_coef, the rollout engine and the optimizer (state allocated now), in that order: vLLM's
    start-up activations are handed back before the optimizer state takes its room. Sharded
    (FSDP), a model is loaded on the host in the checkpoint's bf16 and cast and moved to the GPU
    one unit at a time."""
    from rlvr.modeling import resolve_model_dir

    try:
        model_dir = resolve_model_dir(cfg.model_id)
    except (OSError, ValueError) as e:
        _cannot_load(cfg, e)
    # first, and not waited for: it builds (vLLM: ~1 min of compiling and graph capture) while
    # this process loads the policy and the rollout engine. Both engines are given their KV
    # cache in bytes, so neither profiles the free memory the other is taking.
    eval_engine = (start_engine_process(cfg, mem, model_dir, evals=True) if mem.eval_engine_seqs
                   else None)
    try:
        models = _load_models(cfg, device, mem, model_dir)
        if eval_engine is not None:
            eval_engine.wait_ready()
        return models._replace(eval_engine=eval_engine)
    except BaseException:  # a refusal or a failure: the engine process must not outlive us
        if eval_engine is not None:
            eval_engine.close()
        raise


def _load_models(cfg: Config, device: torch.device, mem: Resolved, model_dir: str) -> Models:
    from rlvr.fsdp import full_tensors
    from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer
    from rlvr.optimizers import check_libraries, make_optimizer, param_dtype_for

    host = torch.device("cpu")
    try:
        tokenizer = load_tokenizer(model_dir)
        policy = load_policy(model_dir, host if mem.fsdp else device, mem.gradient_checkpointing,
                             dtype=torch.bfloat16 if mem.fsdp else param_dtype_for(mem.optim))
    except (OSError, ValueError) as e:
        _cannot_load(cfg, e)
    trainer = _trainer(policy, device, mem.fsdp, param_dtype_for(mem.optim))
    # padding-free micro-batches where torch's varlen flash attention runs (CUDA); elsewhere the
    # padded layout, whose sdpa kernels need no N x N mask
    mem.packed = device.type == "cuda" and enable_packed_attention(policy) == "varlen"
    if cfg.compile:
        compile_policy(policy, device, mem.fsdp)
    reference = None
    if cfg.kl_coef > 0:
        ref_model = load_policy(model_dir, host if mem.fsdp else device, False,
                                dtype=torch.bfloat16)
        ref_model.requires_grad_(False).eval()
        reference = _trainer(ref_model, device, mem.fsdp, torch.bfloat16)
        if mem.packed:
            enable_packed_attention(ref_model)
    eos_ids = eos_token_ids(policy, tokenizer)
    try:
        check_libraries(mem.optim)
    except ValueError as e:
        fail(str(e))
    engine = (start_engine_process(cfg, mem, model_dir, evals=False) if cfg.async_rollout
              else build_engine(cfg, mem, policy, tokenizer, model_dir, eos_ids))
    if device.type == "cuda":
        # vLLM's profiling run and sampler warm-up leave GBs cached in torch's allocator, which
        # the policy shares in this process; hand them back before training allocates
        torch.cuda.empty_cache()
    # Allocating the state takes one zero-gradient step: a gradient's worth of memory on top of
    # the rollout phase, which only an update has room for when the plan sleeps vLLM, so vLLM
    # sleeps as in an update and wakes by a weight load.
    engine.sleep()
    try:
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, name=mem.optim,
                                   betas=tuple(cfg.adam_betas))
    except ValueError as e:
        fail(str(e))
    if device.type == "cuda":
        # the zero step's freed gradients would stay cached through the first eval
        torch.cuda.empty_cache()
    if mem.sleep:
        engine.load_weights(full_tensors(policy))
    return Models(tokenizer, policy, trainer, optimizer, engine, reference)
