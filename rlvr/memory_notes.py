"""Why a memory plan is what it is (`MemoryPlan.notes`), and the one-line refusal when none fits.

Both compare the chosen setting with the ones the search in rlvr/memory_search.py tried or would
try, so they re-run parts of it.
"""

from __future__ import annotations

import math
from dataclasses import replace

from rlvr.memory import (
    AUTO_OPTIM_ORDER,
    GIB,
    HOST_STATE_SHARE,
    MIN_HEADROOM_SHARE,
    NO_CKPT_MAX_ACTIVATION_SHARE,
    SLEEP_MIN_PARAMS,
    activation_gib,
    kv_tokens_wanted,
)
from rlvr.memory_search import Candidate, PlanRequest, Setting, leanest, optim_order, search

# --- notes: why each choice --------------------------------------------------------------------


def _train(e: Candidate) -> float:
    return sum(e.train.values())


def _last(tried: list[Candidate], best: Candidate, pred) -> Candidate | None:
    """The last setting tried before `best` (same optimizer) for which `pred` holds."""
    hits = [e for e in tried[:tried.index(best)]
            if e.setting.optim == best.setting.optim and pred(e.setting)]
    return hits[-1] if hits else None


def _optim_note(req: PlanRequest, best: Candidate, tried: list[Candidate]) -> str:
    o = best.setting.optim
    kind = "exact" if req.specs[o].exact else "not bit-exact"
    if req.optim is not None:
        return f"optimizer {o} ({kind}) as given by --optim"
    worse = {e.setting.optim: leanest(req, e.setting.optim).peak
             for e in tried if e.setting.optim != o}
    why = [f"{name} needs >= {peak:.1f} GiB" for name, peak in worse.items()]
    order = [x for x in AUTO_OPTIM_ORDER if x in req.specs]
    why += [f"{x} needs {req.host_state_gib(x):.1f} GiB of host memory (> {HOST_STATE_SHARE:.0%} "
            f"of {req.host_gib:.1f})"
            for x in order[:order.index(o) if o in order else len(order)] if not req.host_fits(x)]
    return f"optimizer {o} ({kind}): {', '.join(why) if why else 'the first choice, it fits'}"


def _sleep_note(req: PlanRequest, best: Candidate, tried: list[Candidate]) -> str:
    on = best.setting.sleep
    if req.sleep is not None:
        return f"vLLM sleep {'on' if on else 'off'} as given by --vllm_sleep"
    if not on:
        return "vLLM stays awake while the policy trains (no sleep/wake cost)"
    if req.shape.n_params >= SLEEP_MIN_PARAMS:
        return (f"vLLM sleeps (level 2) while the policy trains: a model of "
                f">= {SLEEP_MIN_PARAMS / 1e9:g}B parameters (~0.1 s a step for GBs)")
    awake = _last(tried, best, lambda s: not s.sleep)
    return (f"vLLM sleeps (level 2) while the policy trains: awake, the train phase needs "
            f"{_train(awake):.1f} GiB")


def _ckpt_note(req: PlanRequest, best: Candidate, tried: list[Candidate]) -> str:
    s = best.setting
    if req.checkpointing is not None:
        return f"checkpointing {'on' if s.checkpointing else 'off'} as given"
    share = f"{NO_CKPT_MAX_ACTIVATION_SHARE:.0%} of the budget"
    if not s.checkpointing:
        act = activation_gib(req.shape, max(s.micro_batch_tokens, req.wl.max_train_seq), False)
        return f"checkpointing off: a micro-batch's activations ({act:.1f} GiB) are <= {share}"
    off = _last(tried, best, lambda x: not x.checkpointing)
    if off is not None:
        return f"checkpointing on: without it the train phase needs {_train(off):.1f} GiB"
    first = next(e for e in tried if e.setting.optim == s.optim).setting.micro_batch_tokens
    act = activation_gib(req.shape, max(first, req.wl.max_train_seq), False)
    return (f"checkpointing on: without it a {first:,}-token micro-batch holds {act:.1f} GiB of "
            f"activations, > {share}")


def _mb_note(req: PlanRequest, best: Candidate, tried: list[Candidate]) -> str:
    mb = best.setting.micro_batch_tokens
    if req.micro_batch_tokens is not None:
        return f"micro-batches of {mb:,} padded tokens as given by --micro_batch_tokens"
    bigger = _last(tried, best, lambda s: s.micro_batch_tokens > mb)
    if bigger is None:
        return f"micro-batches of {mb:,} padded tokens"
    return (f"micro-batches of {mb:,} padded tokens: with {bigger.setting.micro_batch_tokens:,} "
            f"the train phase needs {_train(bigger):.1f} GiB")


def _kv_note(req: PlanRequest, best: Candidate) -> str:
    wl, kv = req.wl, best.rollout["kv_cache"]
    if best.kv_tokens is None:
        return (f"vLLM takes --gpu_mem_util {req.gpu_mem_util} of the budget "
                f"({req.gpu_mem_util * req.budget:.1f} GiB; KV cache ~{kv:.1f} GiB)")
    eval_len = wl.typical_prompt_tokens + wl.eval_max_tokens
    wanted = kv_tokens_wanted(wl)
    if best.kv_tokens < wanted:
        return (f"KV cache cut to {best.kv_tokens:,} of {wanted:,} tokens ({kv:.2f} GiB): "
                f"~{best.kv_tokens // eval_len} eval sequences decode at once, the rest queue")
    return (f"KV cache {best.kv_tokens:,} tokens ({kv:.2f} GiB): the most of rollouts "
            f"{min(wl.rollout_seqs, wl.max_num_seqs)} x {wl.max_train_seq}, eval "
            f"{min(wl.max_num_seqs, wl.eval_seqs)} x {eval_len}, one {wl.max_model_len}")


def plan_notes(req: PlanRequest, best: Candidate, tried: list[Candidate]) -> list[str]:
    notes = [_optim_note(req, best, tried), _sleep_note(req, best, tried),
             _ckpt_note(req, best, tried), _mb_note(req, best, tried), _kv_note(req, best)]
    cpu = req.shape.n_params * req.specs[best.setting.optim].cpu_bytes / GIB
    if cpu:
        notes.append(f"optimizer state in host memory: {cpu:.1f} GiB")
    if req.wl.reference_model:
        notes.append(f"frozen bf16 reference model: {best.rollout['reference']:.1f} GiB")
    return notes


# --- refusal: one line with the budget needed and what would fit ---------------------------------

_FLAGS = {"optim": "--optim", "checkpointing": "--gradient_checkpointing",
          "sleep": "--vllm_sleep", "micro_batch_tokens": "--micro_batch_tokens",
          "gpu_mem_util": "--gpu_mem_util"}


def _flag(name: str, value) -> str:
    if name == "gpu_mem_util" and value is None:
        return "no --gpu_mem_util"
    text = str(value).lower() if isinstance(value, bool) else value
    return f"{_FLAGS[name]} {text}"


def _setting_value(name: str, e: Candidate):
    return None if name == "gpu_mem_util" else getattr(e.setting, name)


def _describe(s: Setting) -> str:
    return (f"{s.optim}, checkpointing {'on' if s.checkpointing else 'off'}, vLLM sleep "
            f"{'on' if s.sleep else 'off'}, {s.micro_batch_tokens:,}-token micro-batches")


def _fix(req: PlanRequest) -> str | None:
    """The given options to drop, or the shorter responses, that would make the run fit."""
    # under FSDP2 the optimizer is AdamW whatever was asked (the others keep state it does not
    # shard): suggesting another would suggest a refused run
    forced = [n for n in _FLAGS if getattr(req, n) is not None
              and not (n == "optim" and req.wl.fsdp_shards is not None)]
    for names in [[n] for n in forced] + ([forced] if len(forced) > 1 else []):
        best, _ = search(replace(req, **{n: None for n in names}))
        if best is not None:
            flags = ", ".join(_flag(n, _setting_value(n, best)) for n in names)
            return f"it fits {req.budget:.1f} GiB with {flags}"
    wl = req.wl
    tokens = wl.max_tokens
    while tokens > 64:
        tokens //= 2
        evals = tokens if wl.eval_max_tokens == wl.max_tokens else wl.eval_max_tokens
        shorter = replace(wl, max_tokens=tokens, eval_max_tokens=evals)
        if search(replace(req, wl=shorter))[0] is not None:
            return f"it fits {req.budget:.1f} GiB with --max_tokens {tokens}"
    return None


def _host_fix(req: PlanRequest) -> str | None:
    """An offloading optimizer that fits the GPU but was left out for the host's RAM."""
    left_out = [x for x in req.specs if not req.host_fits(x) and req.optim in (None, x)]
    for o in sorted(left_out, key=req.host_state_gib):
        if search(replace(req, optim=o, host_gib=None))[0] is not None:
            need = math.ceil(req.host_state_gib(o) / HOST_STATE_SHARE)
            return (f"--optim {o} would fit with >= {need} GiB of host RAM (--host_memory_gb, "
                    f"now {req.host_gib:.0f} GiB)")
    return None


def refusal_message(req: PlanRequest) -> str:
    lean = min((leanest(req, o) for o in optim_order(req)), key=lambda e: e.peak)
    need = math.ceil(lean.peak / (1 - MIN_HEADROOM_SHARE) * 10) / 10
    given = [_flag(n, getattr(req, n)) for n in _FLAGS if getattr(req, n) is not None]
    head = (f"the run needs >= {need:.1f} GiB of GPU memory"
            f"{' with ' + ', '.join(given) if given else ''}, the budget is {req.budget:.1f} GiB")
    fix = _fix(req) or _host_fix(req)
    if fix is not None:
        return f"{head}; {fix}"
    more = "more GPUs to shard over, " if req.wl.fsdp_shards is not None else ""
    return (f"{head} (leanest plan: {_describe(lean.setting)}); use {more}a larger GPU or a "
            "smaller model")

