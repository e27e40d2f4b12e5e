"""How `plan_memory` chooses a plan, explains it (`MemoryPlan.notes`) and refuses one.

The search walks the settings in a fixed order and takes the first whose predicted peak fits the
budget, so the same inputs always give the same plan. The cost model is in rlvr/memory.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from rlvr.memory import (
    AUTO_OPTIM_ORDER,
    BF16_BYTES,
    CUDA_CONTEXT_GIB,
    DEFAULT_MICRO_BATCH_TOKENS,
    FRAGMENTATION_SHARE,
    GIB,
    HOST_STATE_SHARE,
    KV_BLOCK_TOKENS,
    MIN_HEADROOM_SHARE,
    MIN_MICRO_BATCH_TOKENS,
    NO_CKPT_MAX_ACTIVATION_SHARE,
    SLEEP_FRAGMENTATION_SHARE,
    SLEEP_MIN_PARAMS,
    SLEEP_MODE_ROLLOUT_GIB,
    MemoryPlan,
    ModelShape,
    PlanError,
    Workload,
    activation_gib,
    kv_tokens_floor,
    kv_tokens_wanted,
    logits_gib,
    policy_gib,
    vllm_overhead_gib,
    vllm_startup_gib,
)


@dataclass(frozen=True)
class _Request:
    """What the caller asked for; None = the plan decides."""
    shape: ModelShape
    wl: Workload
    budget: float
    specs: dict
    optim: str | None
    checkpointing: bool | None
    sleep: bool | None
    micro_batch_tokens: int | None
    gpu_mem_util: float | None
    host_gib: float | None = None

    def host_state_gib(self, optim: str) -> float:
        return self.shape.n_params * self.specs[optim].cpu_bytes / GIB

    def host_fits(self, optim: str) -> bool:
        return self.host_gib is None or \
            self.host_state_gib(optim) <= HOST_STATE_SHARE * self.host_gib

    @property
    def limit(self) -> float:
        """What a plan may fill: the budget less the headroom every plan keeps free."""
        return self.budget * (1 - MIN_HEADROOM_SHARE)


@dataclass(frozen=True)
class _Setting:
    optim: str
    checkpointing: bool
    sleep: bool
    micro_batch_tokens: int
    shrink_kv: bool = False


@dataclass(frozen=True)
class _Eval:
    setting: _Setting
    kv_tokens: int | None
    rollout: dict[str, float]
    train: dict[str, float]

    @property
    def peak(self) -> float:
        return max(sum(self.rollout.values()), sum(self.train.values()))


def _auto_choice(value: str | bool | None) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if value not in ("auto", "true", "false"):
        raise PlanError(f"expected auto, true or false, got {value!r}")
    return None if value == "auto" else value == "true"


def _mb_floor(wl: Workload) -> int:
    return max(MIN_MICRO_BATCH_TOKENS, wl.max_train_seq)


def _phases(req: _Request, s: _Setting, kv_tokens: int | None) -> tuple[dict, dict]:
    shape, wl = req.shape, req.wl
    pol = policy_gib(shape, req.specs[s.optim], s.checkpointing)
    ref = shape.n_params * BF16_BYTES / GIB if wl.reference_model else 0.0
    vw, ov = shape.n_params * BF16_BYTES / GIB, vllm_overhead_gib(shape, wl)
    if req.gpu_mem_util is None:
        kv = kv_tokens * shape.kv_bytes_per_token / GIB
    else:  # vLLM sizes its KV cache from what its share leaves
        kv = max(req.gpu_mem_util * req.budget - vw - ov, 0.0)
    act = activation_gib(shape, max(s.micro_batch_tokens, wl.max_train_seq), s.checkpointing)
    logits = logits_gib(shape, wl.logit_chunk_tokens)
    share = SLEEP_FRAGMENTATION_SHARE if s.sleep else FRAGMENTATION_SHARE
    # what sleep/wake cycles leave in the rollout phase; vLLM's start-up comes before any cycle
    sleep_extra = SLEEP_MODE_ROLLOUT_GIB if s.sleep else 0.0
    frag = share * (pol["grads"] + pol["autocast"] + act + logits)
    awake = 0.0 if s.sleep else 1.0
    # the rollout column also covers vLLM's start-up, when its profiling activations are alive;
    # the optimizer state is allocated only after that (run_setup.load_models) and no sleep/wake
    # has happened yet, so the start-up moment is higher than the steady rollout phase only by
    # what the activations exceed those two by
    rollout = {"weights": pol["weights"], "grads": 0.0, "optimizer": pol["optimizer"],
               "autocast": 0.0, "activations": 0.0, "logits": 0.0, "reference": ref,
               "vllm_weights": vw, "kv_cache": kv, "vllm_overhead": ov,
               "vllm_startup": max(vllm_startup_gib(shape) - pol["optimizer"] - sleep_extra, 0.0),
               "context": CUDA_CONTEXT_GIB, "fragmentation": sleep_extra}
    train = {**pol, "activations": act, "logits": logits, "reference": ref,
             "vllm_weights": vw * awake, "kv_cache": kv * awake, "vllm_overhead": ov,
             "vllm_startup": 0.0, "context": CUDA_CONTEXT_GIB, "fragmentation": frag}
    return rollout, train


def _evaluate(req: _Request, s: _Setting) -> _Eval:
    if req.gpu_mem_util is not None:
        return _Eval(s, None, *_phases(req, s, None))
    wanted = kv_tokens_wanted(req.wl)
    if not s.shrink_kv:
        return _Eval(s, wanted, *_phases(req, s, wanted))
    # the KV cache takes what the budget leaves in the phases that hold it, within [floor, wanted]
    rollout, train = _phases(req, s, 0)
    room = req.limit - sum(rollout.values())
    if not s.sleep:
        room = min(room, req.limit - sum(train.values()))
    tokens = int(room * GIB // req.shape.kv_bytes_per_token) // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
    tokens = min(max(tokens, kv_tokens_floor(req.wl)), wanted)
    return _Eval(s, tokens, *_phases(req, s, tokens))


def _no_ckpt_small(req: _Request, mb: int) -> bool:
    act = activation_gib(req.shape, max(mb, req.wl.max_train_seq), False)
    return act <= NO_CKPT_MAX_ACTIVATION_SHARE * req.budget


def _first(req: _Request, optim: str) -> _Setting:
    """As asked, else: the default micro-batch, checkpointing by the activation share, and vLLM
    asleep during updates from SLEEP_MIN_PARAMS up, where its weights and KV cache are GBs and a
    sleep/wake (~0.1 s) is a few percent of a step."""
    mb = req.micro_batch_tokens or max(DEFAULT_MICRO_BATCH_TOKENS, _mb_floor(req.wl))
    ckpt = req.checkpointing if req.checkpointing is not None else not _no_ckpt_small(req, mb)
    sleep = req.sleep if req.sleep is not None else req.shape.n_params >= SLEEP_MIN_PARAMS
    return _Setting(optim, ckpt, sleep, mb)


def _train_relief(req: _Request, s: _Setting) -> _Setting | None:
    """The next setting that lowers the train phase, in search order: vLLM sleep, checkpointing,
    a halved micro-batch (not below one longest sequence); choices given stay as given."""
    if req.sleep is None and not s.sleep:
        return replace(s, sleep=True)
    if req.checkpointing is None and not s.checkpointing:
        return replace(s, checkpointing=True)
    floor = _mb_floor(req.wl)
    if req.micro_batch_tokens is None and s.micro_batch_tokens > floor:
        return replace(s, micro_batch_tokens=max(s.micro_batch_tokens // 2, floor))
    return None


def _leanest(req: _Request, optim: str) -> _Eval:
    """The smallest plan the given choices allow with this optimizer (its peak is the least
    budget it needs: every relief lowers the train phase; sleep adds SLEEP_MODE_ROLLOUT_GIB to
    the rollout phase, which the KV floor keeps below the train phase for the shapes we know)."""
    s = _first(req, optim)
    while (nxt := _train_relief(req, s)) is not None:
        s = nxt
    if req.gpu_mem_util is not None:
        return _Eval(s, None, *_phases(req, s, None))
    floor = kv_tokens_floor(req.wl)
    return _Eval(replace(s, shrink_kv=True), floor, *_phases(req, s, floor))


def _search_optim(req: _Request, optim: str, tried: list[_Eval]) -> _Eval | None:
    """Relieve the train phase only while it is over budget (sleep, checkpointing and smaller
    micro-batches cost speed and do nothing for the rollout phase), then cut the KV cache."""
    s = _first(req, optim)
    while True:
        tried.append(e := _evaluate(req, s))
        if e.peak <= req.limit:
            return e
        nxt = _train_relief(req, s) if sum(e.train.values()) > req.limit else None
        if nxt is None and not s.shrink_kv and req.gpu_mem_util is None:
            nxt = replace(s, shrink_kv=True)
        if nxt is None:
            return None
        s = nxt


def _optim_order(req: _Request) -> list[str]:
    if req.optim is not None:
        return [req.optim]
    order = [o for o in AUTO_OPTIM_ORDER if o in req.specs]
    return [o for o in order + sorted(o for o in req.specs if o not in order) if req.host_fits(o)]


def _search(req: _Request) -> tuple[_Eval | None, list[_Eval]]:
    """The first setting that fits, in search order, and every setting tried."""
    tried: list[_Eval] = []
    for optim in _optim_order(req):
        if (e := _search_optim(req, optim, tried)) is not None:
            return e, tried
    return None, tried


def _request(shape: ModelShape, wl: Workload, budget: float, specs: dict, optim: str,
             checkpointing: str | bool, sleep: str | bool, mb: int | None,
             util: float | None, host_gib: float | None) -> _Request:
    if not budget > 0:
        raise PlanError(f"the GPU memory budget must be > 0 GiB, got {budget}")
    if optim != "auto" and optim not in specs:
        raise PlanError(f"unknown --optim {optim!r}; one of auto, {', '.join(specs)}")
    if util is not None and not 0 < util < 1:
        raise PlanError(f"--gpu_mem_util must be in (0, 1), got {util}")
    if mb is not None and mb < 1:
        raise PlanError(f"--micro_batch_tokens must be >= 1, got {mb}")
    bad = [k for k, v in wl.__dict__.items() if not isinstance(v, bool) and v < 1]
    if bad:
        raise PlanError(f"workload {bad[0]} must be >= 1, got {getattr(wl, bad[0])}")
    req = _Request(shape, wl, float(budget), specs, None if optim == "auto" else optim,
                   _auto_choice(checkpointing), _auto_choice(sleep), mb, util, host_gib)
    if req.optim is not None and not req.host_fits(req.optim):
        raise PlanError(f"--optim {optim} keeps {req.host_state_gib(optim):.1f} GiB of optimizer "
                        f"state in host memory, more than {HOST_STATE_SHARE:.0%} of the host's "
                        f"{host_gib:.1f} GiB (--host_memory_gb)")
    fixed = shape.n_params * BF16_BYTES / GIB + vllm_overhead_gib(shape, wl)
    if util is not None and util * budget < fixed:
        raise PlanError(f"--gpu_mem_util {util} gives vLLM {util * budget:.1f} GiB, less than "
                        f"its weights + overhead ({fixed:.1f} GiB); leave it unset")
    return req


def _make_plan(req: _Request, e: _Eval, notes: list[str]) -> MemoryPlan:
    s, spec = e.setting, req.specs[e.setting.optim]
    rollout, train = sum(e.rollout.values()), sum(e.train.values())
    peak = max(rollout, train)
    kv_bytes = None if e.kv_tokens is None else e.kv_tokens * req.shape.kv_bytes_per_token
    share = e.rollout["vllm_weights"] + e.rollout["kv_cache"] + e.rollout["vllm_overhead"]
    return MemoryPlan(
        optim=s.optim, optim_exact=bool(spec.exact), gradient_checkpointing=s.checkpointing,
        sleep=s.sleep, micro_batch_tokens=s.micro_batch_tokens, kv_cache_tokens=e.kv_tokens,
        kv_cache_bytes=kv_bytes, gpu_mem_util=req.gpu_mem_util, vllm_share_gib=share,
        rollout_gib=dict(e.rollout), train_gib=dict(e.train), rollout_peak_gib=rollout,
        train_peak_gib=train, planned_peak_gib=peak, budget_gib=req.budget,
        headroom_gib=req.budget - peak, cpu_gib=req.shape.n_params * spec.cpu_bytes / GIB,
        notes=tuple(notes))


def plan(shape: ModelShape, wl: Workload, budget: float, specs: dict, optim: str,
         checkpointing: str | bool, sleep: str | bool, mb: int | None,
         util: float | None, host_gib: float | None = None) -> MemoryPlan:
    """`plan_memory`'s work (see its docstring)."""
    req = _request(shape, wl, budget, specs, optim, checkpointing, sleep, mb, util, host_gib)
    best, tried = _search(req)
    if best is None:
        raise PlanError(_refusal(req))
    return _make_plan(req, best, _notes(req, best, tried))


# --- notes: why each choice --------------------------------------------------------------------


def _train(e: _Eval) -> float:
    return sum(e.train.values())


def _last(tried: list[_Eval], best: _Eval, pred) -> _Eval | None:
    """The last setting tried before `best` (same optimizer) for which `pred` holds."""
    hits = [e for e in tried[:tried.index(best)]
            if e.setting.optim == best.setting.optim and pred(e.setting)]
    return hits[-1] if hits else None


def _optim_note(req: _Request, best: _Eval, tried: list[_Eval]) -> str:
    o = best.setting.optim
    kind = "exact" if req.specs[o].exact else "not bit-exact"
    if req.optim is not None:
        return f"optimizer {o} ({kind}) as given by --optim"
    worse = {e.setting.optim: _leanest(req, e.setting.optim).peak
             for e in tried if e.setting.optim != o}
    why = [f"{name} needs >= {peak:.1f} GiB" for name, peak in worse.items()]
    order = [x for x in AUTO_OPTIM_ORDER if x in req.specs]
    why += [f"{x} needs {req.host_state_gib(x):.1f} GiB of host memory (> {HOST_STATE_SHARE:.0%} "
            f"of {req.host_gib:.1f})"
            for x in order[:order.index(o) if o in order else len(order)] if not req.host_fits(x)]
    return f"optimizer {o} ({kind}): {', '.join(why) if why else 'the first choice, it fits'}"


def _sleep_note(req: _Request, best: _Eval, tried: list[_Eval]) -> str:
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


def _ckpt_note(req: _Request, best: _Eval, tried: list[_Eval]) -> str:
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


def _mb_note(req: _Request, best: _Eval, tried: list[_Eval]) -> str:
    mb = best.setting.micro_batch_tokens
    if req.micro_batch_tokens is not None:
        return f"micro-batches of {mb:,} padded tokens as given by --micro_batch_tokens"
    bigger = _last(tried, best, lambda s: s.micro_batch_tokens > mb)
    if bigger is None:
        return f"micro-batches of {mb:,} padded tokens"
    return (f"micro-batches of {mb:,} padded tokens: with {bigger.setting.micro_batch_tokens:,} "
            f"the train phase needs {_train(bigger):.1f} GiB")


def _kv_note(req: _Request, best: _Eval) -> str:
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


def _notes(req: _Request, best: _Eval, tried: list[_Eval]) -> list[str]:
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


def _setting_value(name: str, e: _Eval):
    return None if name == "gpu_mem_util" else getattr(e.setting, name)


def _describe(s: _Setting) -> str:
    return (f"{s.optim}, checkpointing {'on' if s.checkpointing else 'off'}, vLLM sleep "
            f"{'on' if s.sleep else 'off'}, {s.micro_batch_tokens:,}-token micro-batches")


def _fix(req: _Request) -> str | None:
    """The given options to drop, or the shorter responses, that would make the run fit."""
    forced = [n for n in _FLAGS if getattr(req, n) is not None]
    for names in [[n] for n in forced] + ([forced] if len(forced) > 1 else []):
        best, _ = _search(replace(req, **{n: None for n in names}))
        if best is not None:
            flags = ", ".join(_flag(n, _setting_value(n, best)) for n in names)
            return f"it fits {req.budget:.1f} GiB with {flags}"
    wl = req.wl
    tokens = wl.max_tokens
    while tokens > 64:
        tokens //= 2
        evals = tokens if wl.eval_max_tokens == wl.max_tokens else wl.eval_max_tokens
        shorter = replace(wl, max_tokens=tokens, eval_max_tokens=evals)
        if _search(replace(req, wl=shorter))[0] is not None:
            return f"it fits {req.budget:.1f} GiB with --max_tokens {tokens}"
    return None


def _host_fix(req: _Request) -> str | None:
    """An offloading optimizer that fits the GPU but was left out for the host's RAM."""
    left_out = [x for x in req.specs if not req.host_fits(x) and req.optim in (None, x)]
    for o in sorted(left_out, key=req.host_state_gib):
        if _search(replace(req, optim=o, host_gib=None))[0] is not None:
            need = math.ceil(req.host_state_gib(o) / HOST_STATE_SHARE)
            return (f"--optim {o} would fit with >= {need} GiB of host RAM (--host_memory_gb, "
                    f"now {req.host_gib:.0f} GiB)")
    return None


def _refusal(req: _Request) -> str:
    leanest = min((_leanest(req, o) for o in _optim_order(req)), key=lambda e: e.peak)
    need = math.ceil(leanest.peak / (1 - MIN_HEADROOM_SHARE) * 10) / 10
    given = [_flag(n, getattr(req, n)) for n in _FLAGS if getattr(req, n) is not None]
    head = (f"the run needs >= {need:.1f} GiB of GPU memory"
            f"{' with ' + ', '.join(given) if given else ''}, the budget is {req.budget:.1f} GiB")
    fix = _fix(req) or _host_fix(req)
    if fix is not None:
        return f"{head}; {fix}"
    return (f"{head} (leanest plan: {_describe(leanest.setting)}); use a larger GPU or a "
            "smaller model")

