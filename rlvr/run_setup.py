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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlvr.attention import enable_packed_attention
from rlvr.cli import fail
from rlvr.config import RESUMABLE_FIELDS, Config
from rlvr.data import DataError, load_subset, stratified_subset
from rlvr.logprobs import LOGIT_CHUNK_TOKENS
from rlvr.memory import KNOWN_SHAPES, PlanError, Workload, model_shape_from_config
from rlvr.memory_plan import MemoryPlan, plan_memory
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


# ----------------------------------------------------------------------------- the run directory


def check_run_dir(cfg: Config) -> None:
    """Refuse to clobber an existing run; a resume needs the run's config.json."""
    if not cfg.resume and cfg.run_dir.exists():
        fail(f"run directory {cfg.run_dir} already exists; pass --resume to continue it, or "
             "choose another --exp_name / --output_dir")
    if cfg.resume and not (cfg.run_dir / "config.json").is_file():
        fail(f"nothing to resume: {cfg.run_dir / 'config.json'} not found; check --output_dir "
             "and --exp_name, or start the run without --resume")


def write_config(cfg: Config, device: torch.device, step: int, plan: dict | None) -> None:
    """config.json: the settings in force now, the memory plan, and how the run got here.

    A resume keeps the original provenance, appends its own under "resumes", and records under
    "settings_history" which resumable settings changed from which step, so the file always says
    what steps 0..N-1 ran with.
    """
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.json"
    now = cfg.to_json()
    data = {**now, "memory_plan": plan, "provenance": provenance(device),
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
                    resumes=old.get("resumes", []) + [provenance(device)],
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


def workload(cfg: Config, eval_problems: int) -> Workload:
    eval_n = 1 if cfg.eval_temperature == 0 else cfg.eval_n
    return Workload(rollout_seqs=cfg.rollout_batch_size, max_prompt_tokens=cfg.max_prompt_tokens,
                    max_tokens=cfg.max_tokens, eval_seqs=eval_problems * eval_n,
                    eval_max_tokens=cfg.eval_max_tokens or cfg.max_tokens,
                    max_num_seqs=cfg.vllm_max_num_seqs, reference_model=cfg.kl_coef > 0,
                    logit_chunk_tokens=LOGIT_CHUNK_TOKENS)


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


def saved_optimizer(cfg: Config) -> str | None:
    """On --resume, the optimizer the run's checkpoint was written by: a new plan must not pick
    another (its state would not load), whatever the card or the budget is now."""
    path = cfg.run_dir / "config.json"
    if not cfg.resume or not path.is_file():
        return None
    return (json.loads(path.read_text()).get("memory_plan") or {}).get("optim")


def plan_for(cfg: Config, eval_problems: int) -> MemoryPlan:
    """The memory plan for this run on this card (or on --gpu_memory_gb); PlanError with the
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
    return plan_memory(
        shape, workload(cfg, eval_problems), budget, optim=saved_optimizer(cfg) or cfg.optim,
        gradient_checkpointing=forced.get(str(cfg.gradient_checkpointing).lower(), "auto"),
        sleep=forced.get(str(cfg.vllm_sleep).lower(), "auto"),
        micro_batch_tokens=cfg.micro_batch_tokens, gpu_mem_util=cfg.gpu_mem_util,
        host_gib=cfg.host_memory_gb or host_ram_gib())


def make_plan(cfg: Config, eval_problems: int) -> MemoryPlan:
    """`plan_for`, or its reason as a one-line refusal (exit status 2)."""
    try:
        return plan_for(cfg, eval_problems)
    except PlanError as e:
        fail(str(e))


def eval_problem_count(cfg: Config) -> int:
    """How many eval problems the run will have, from the data file alone (for the plan)."""
    path = Path(cfg.data_dir) / "test.jsonl"
    n = sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 1250
    return min(n, cfg.eval_limit or n)


def dry_run(cfg: Config) -> int:
    plan = make_plan(cfg, eval_problem_count(cfg))
    print(plan.format_table())
    return 0


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


def memory_fraction(plan: MemoryPlan, card: float) -> float:
    """torch's per-process cap for a budget below the card. torch counts vLLM's weights and KV
    cache as allocated also while vLLM sleeps (their virtual addresses stay in its memory pool,
    only the physical pages go), so in sleep mode the cap adds them back: otherwise a 3B update
    under a 24 GiB budget was refused at 11.5 GiB of real use. The cap thus holds updates to the
    budget; while vLLM is awake it allows that much more, and the rollout phase is held to the
    budget by the plan's fixed KV cache size instead."""
    asleep = plan.rollout_gib["vllm_weights"] + plan.rollout_gib["kv_cache"] if plan.sleep else 0.0
    return min((plan.budget_gib + asleep) / card, 1.0)


def resolve_memory(cfg: Config, device: torch.device, eval_problems: int) -> Resolved:
    if device.type != "cuda":
        gc = {"true": True}.get(str(cfg.gradient_checkpointing).lower(), False)
        optim = CPU_DEFAULTS["optim"] if cfg.optim == "auto" else cfg.optim
        return Resolved(optim, gc, cfg.micro_batch_tokens or CPU_DEFAULTS["micro_batch_tokens"])
    plan = make_plan(cfg, eval_problems)
    print(plan.format_table(), flush=True)
    budget = cfg.gpu_memory_gb
    if budget is not None and budget < card_gib():
        torch.cuda.set_per_process_memory_fraction(memory_fraction(plan, card_gib()))
    return Resolved(plan.optim, plan.gradient_checkpointing, plan.micro_batch_tokens,
                    plan.sleep, plan.kv_cache_bytes, plan.to_dict())


# ----------------------------------------------------------------------------- models and engine


def build_engine(cfg: Config, mem: Resolved, policy, tokenizer, model_dir: str, eos_ids):
    from rlvr.engines import HFEngine, vllm_available

    backend = cfg.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    if backend == "hf":
        return HFEngine(policy, tokenizer, eos_ids)
    from rlvr.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_dir, tokenizer, eos_ids, seed=cfg.seed, max_num_seqs=cfg.vllm_max_num_seqs,
        max_model_len=cfg.max_prompt_tokens + max(cfg.max_tokens, cfg.eval_max_tokens or 0),
        sleep_mode=mem.sleep, kv_cache_bytes=None if cfg.gpu_mem_util else mem.kv_cache_bytes,
        # the plan gave vLLM gpu_mem_util x the budget; vLLM takes its share of the whole card
        gpu_mem_util=mem.plan["vllm_share_gib"] / card_gib() if cfg.gpu_mem_util else None)


def compile_policy(policy, device: torch.device) -> None:
    """--compile: regional compilation of the layers plus the LM-head loss; compiling happens
    in the first update."""
    if device.type != "cuda":
        print("note: --compile applies on a CUDA GPU only; running eager", flush=True)
        return
    from rlvr.attention import compile_decoder_layers
    from rlvr.logprobs import compile_logit_head

    compile_decoder_layers(policy)
    compile_logit_head()


def load_models(cfg: Config, device: torch.device, mem: Resolved):
    """Tokenizer, policy (in the dtype its optimizer keeps), the frozen reference policy for
    --kl_coef, the rollout engine and the optimizer (state allocated now), in that order: vLLM's
    start-up activations are handed back before the optimizer state takes its room."""
    from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer, resolve_model_dir
    from rlvr.optimizers import check_libraries, param_dtype_for
    from rlvr.training import make_optimizer

    try:
        model_dir = resolve_model_dir(cfg.model_id)
        tokenizer = load_tokenizer(model_dir)
        policy = load_policy(model_dir, device, mem.gradient_checkpointing,
                             dtype=param_dtype_for(mem.optim))
    except (OSError, ValueError) as e:  # a bad path or hub id, an unsupported model
        fail(f"cannot load --model_id {cfg.model_id}: {str(e).strip().splitlines()[0]}; pass a "
             "hub id, a local model directory or a .gguf file")
    # padding-free micro-batches where torch's varlen flash attention runs (CUDA); elsewhere the
    # padded layout, whose sdpa kernels need no N x N mask
    mem.packed = device.type == "cuda" and enable_packed_attention(policy) == "varlen"
    if cfg.compile:
        compile_policy(policy, device)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = load_policy(model_dir, device, False, dtype=torch.bfloat16)
        ref_model.requires_grad_(False).eval()
        if mem.packed:
            enable_packed_attention(ref_model)
    eos_ids = eos_token_ids(policy, tokenizer)
    try:
        check_libraries(mem.optim)
    except ValueError as e:
        fail(str(e))
    engine = build_engine(cfg, mem, policy, tokenizer, model_dir, eos_ids)
    if device.type == "cuda":
        # vLLM's profiling run and sampler warm-up leave GBs cached in torch's allocator, which
        # the policy shares in this process; hand them back before training allocates
        torch.cuda.empty_cache()
    # Allocating the state takes one zero-gradient step: a gradient's worth of memory on top of
    # the rollout phase, which only an update has room for when the plan sleeps vLLM (1.5B under
    # a 24 GiB budget ran out here), so vLLM sleeps as in an update and wakes by a weight sync.
    engine.sleep()
    try:
        optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay, name=mem.optim,
                                   betas=tuple(cfg.adam_betas))
    except ValueError as e:
        fail(str(e))
    if device.type == "cuda":
        # the zero step's freed gradients would stay cached through the first eval (measured:
        # +3.6 GiB at 1.5B)
        torch.cuda.empty_cache()
    if mem.sleep:
        engine.sync_weights(policy)
    return tokenizer, policy, optimizer, engine, ref_model
