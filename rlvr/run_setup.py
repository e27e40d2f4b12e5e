"""Everything a run needs before its first step: inputs checked, models and engines loaded (the
memory plan they follow is rlvr/run_plan.py).

Order matters and is kept here in one place: every check that can fail on bad input runs before
anything is written or loaded; the memory plan is computed from config.json alone (so `--dry_run`
needs no weights); vLLM starts before the optimizer state is allocated (its start-up activations
are handed back first) and sleeps while the state is made (see load_models).
"""

from __future__ import annotations

import json
import os
import random
from typing import NamedTuple, NoReturn

import numpy as np
import torch

from rlvr import dist
from rlvr.attention import enable_packed_attention
from rlvr.cli import fail
from rlvr.config import RESUMABLE_FIELDS, Config
from rlvr.data import DataError, load_subset, stratified_subset
from rlvr.rollout import RolloutEngine
from rlvr.run_plan import Resolved, card_gib
from rlvr.subset import build_default_subset
from rlvr.tracking import provenance

# The eval sample must not depend on --seed: runs of several seeds are compared on one problem set.
EVAL_SAMPLE_SEED = 0


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
    """An engine in a process of its own (rlvr/engine_process.py) as the plan sized it: a
    concurrent eval engine (with a grader: its share of --grader_workers), or the rollout
    engine of --async_rollout."""
    from rlvr.engine_process import EngineProcess, EngineSpec

    longest = (cfg.eval_max_tokens or cfg.max_tokens if evals
               else max(cfg.max_tokens, cfg.eval_max_tokens or 0))
    graders = cfg.grader_workers or min(8, os.cpu_count() or 1)
    return EngineProcess(EngineSpec(
        backend=cfg.backend, model_dir=model_dir, max_model_len=cfg.max_prompt_tokens + longest,
        seed=cfg.seed, max_num_seqs=mem.eval_engine_seqs if evals else cfg.vllm_max_num_seqs,
        kv_cache_bytes=mem.eval_kv_cache_bytes if evals else mem.kv_cache_bytes,
        grader=evals, grader_workers=max(1, graders // mem.eval_engines),
        grade_timeout_s=cfg.grade_timeout_s))


def start_eval_engines(cfg: Config, mem: Resolved, model_dir: str) -> list:
    """The plan's concurrent eval engines (none where it has none), not waited for."""
    engines = []
    try:
        for _ in range(mem.eval_engines if mem.eval_engine_seqs else 0):
            engines.append(start_engine_process(cfg, mem, model_dir, evals=True))
    except BaseException:
        for proc in engines:
            proc.close()
        raise
    return engines


class Models(NamedTuple):
    tokenizer: object
    policy: torch.nn.Module        # the HF model: the HF engine, checkpoints, the sync's names
    trainer: torch.nn.Module       # PolicyLogprobs over it (in DDP, or FSDP2's root unit)
    optimizer: torch.optim.Optimizer
    engine: RolloutEngine          # in this process, or (--async_rollout) an engine process
    reference: torch.nn.Module | None  # PolicyLogprobs of the frozen initial policy (--kl_coef)
    eval_engines: tuple = ()       # the concurrent evals' engine processes (rlvr/loop_evals.py)


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
    # Engine processes first, and not waited for: they build (vLLM: ~1 min of compiling and
    # graph capture) while this process loads the policy (and the in-process rollout engine).
    # Every engine is given its KV cache in bytes, so none profiles the memory the others take.
    rollout = start_engine_process(cfg, mem, model_dir, evals=False) if cfg.async_rollout else None
    started = [rollout] if rollout is not None else []
    try:
        evals = start_eval_engines(cfg, mem, model_dir)
        started += evals
        models = _load_models(cfg, device, mem, model_dir, rollout)
        for proc in started:
            proc.wait_ready()
        return models._replace(eval_engines=tuple(evals))
    except BaseException:  # a refusal or a failure: no engine process may outlive us
        for proc in started:
            proc.close()
        raise


def _load_models(cfg: Config, device: torch.device, mem: Resolved, model_dir: str,
                 engine_process) -> Models:
    """load_models' work; `engine_process` is --async_rollout's rollout engine, else None."""
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
    engine = engine_process or build_engine(cfg, mem, policy, tokenizer, model_dir, eos_ids)
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
