"""How `plan_memory` (rlvr/memory_plan.py) chooses a plan; rlvr/memory_notes.py explains it and
words a refusal.

The search walks the settings in a fixed order and takes the first whose predicted peak fits the
budget, so the same inputs always give the same plan. The cost model is in rlvr/memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rlvr.memory import (
    AUTO_OPTIM_ORDER,
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
    ModelShape,
    PlanError,
    Workload,
    activation_gib,
    engine_processes_gib,
    kv_bytes_per_rank_token,
    kv_tokens_floor,
    kv_tokens_wanted,
    logits_gib,
    policy_gib,
    reference_gib,
    vllm_overhead_gib,
    vllm_startup_gib,
    vllm_weights_gib,
)


@dataclass(frozen=True)
class PlanRequest:
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
class Setting:
    optim: str
    checkpointing: bool
    sleep: bool
    micro_batch_tokens: int
    shrink_kv: bool = False


@dataclass(frozen=True)
class Candidate:
    setting: Setting
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


def _phases(req: PlanRequest, s: Setting, kv_tokens: int | None) -> tuple[dict, dict]:
    shape, wl = req.shape, req.wl
    pol = policy_gib(shape, req.specs[s.optim], s.checkpointing, wl.fsdp_shards)
    ref = reference_gib(shape, wl)
    vw, ov = vllm_weights_gib(shape, wl), vllm_overhead_gib(shape, wl)
    if req.gpu_mem_util is None:
        kv = kv_tokens * kv_bytes_per_rank_token(shape, wl) / GIB
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
    procs = engine_processes_gib(shape, wl)
    rollout = {"weights": pol["weights"], "grads": 0.0, "optimizer": pol["optimizer"],
               "autocast": 0.0, "activations": 0.0, "logits": 0.0, "reference": ref,
               "vllm_weights": vw, "kv_cache": kv, "vllm_overhead": ov,
               "vllm_startup": max(vllm_startup_gib(shape) - pol["optimizer"] - sleep_extra, 0.0),
               "context": CUDA_CONTEXT_GIB, "fragmentation": sleep_extra}
    train = {**pol, "activations": act, "logits": logits, "reference": ref,
             "vllm_weights": vw * awake, "kv_cache": kv * awake, "vllm_overhead": ov,
             "vllm_startup": 0.0, "context": CUDA_CONTEXT_GIB, "fragmentation": frag}
    if procs:  # a component only of the runs that have engine processes
        rollout["engine_processes"] = train["engine_processes"] = procs
    return rollout, train


def _evaluate(req: PlanRequest, s: Setting) -> Candidate:
    if req.gpu_mem_util is not None:
        return Candidate(s, None, *_phases(req, s, None))
    wanted = kv_tokens_wanted(req.wl)
    if not s.shrink_kv:
        return Candidate(s, wanted, *_phases(req, s, wanted))
    # the KV cache takes what the budget leaves in the phases that hold it, within [floor, wanted]
    rollout, train = _phases(req, s, 0)
    room = req.limit - sum(rollout.values())
    if not s.sleep:
        room = min(room, req.limit - sum(train.values()))
    tokens = (int(room * GIB // kv_bytes_per_rank_token(req.shape, req.wl)) // KV_BLOCK_TOKENS
              * KV_BLOCK_TOKENS)
    tokens = min(max(tokens, kv_tokens_floor(req.wl)), wanted)
    return Candidate(s, tokens, *_phases(req, s, tokens))


def _no_ckpt_small(req: PlanRequest, mb: int) -> bool:
    act = activation_gib(req.shape, max(mb, req.wl.max_train_seq), False)
    return act <= NO_CKPT_MAX_ACTIVATION_SHARE * req.budget


def _first(req: PlanRequest, optim: str) -> Setting:
    """As asked, else: the default micro-batch, checkpointing by the activation share, and vLLM
    asleep during updates from SLEEP_MIN_PARAMS up, where its weights and KV cache are GBs and a
    sleep/wake is a small share of a step (docs/PERFORMANCE.md)."""
    mb = req.micro_batch_tokens or max(DEFAULT_MICRO_BATCH_TOKENS, _mb_floor(req.wl))
    ckpt = req.checkpointing if req.checkpointing is not None else not _no_ckpt_small(req, mb)
    sleep = req.sleep if req.sleep is not None else req.shape.n_params >= SLEEP_MIN_PARAMS
    return Setting(optim, ckpt, sleep, mb)


def _train_relief(req: PlanRequest, s: Setting) -> Setting | None:
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


def leanest(req: PlanRequest, optim: str) -> Candidate:
    """The smallest plan the given choices allow with this optimizer (its peak is the least
    budget it needs: every relief lowers the train phase; sleep adds SLEEP_MODE_ROLLOUT_GIB to
    the rollout phase, which the KV floor keeps below the train phase for the shapes we know)."""
    s = _first(req, optim)
    while (nxt := _train_relief(req, s)) is not None:
        s = nxt
    if req.gpu_mem_util is not None:
        return Candidate(s, None, *_phases(req, s, None))
    floor = kv_tokens_floor(req.wl)
    return Candidate(replace(s, shrink_kv=True), floor, *_phases(req, s, floor))


def _search_optim(req: PlanRequest, optim: str, tried: list[Candidate]) -> Candidate | None:
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


def optim_order(req: PlanRequest) -> list[str]:
    if req.optim is not None:
        return [req.optim]
    order = [o for o in AUTO_OPTIM_ORDER if o in req.specs]
    return [o for o in order + sorted(o for o in req.specs if o not in order) if req.host_fits(o)]


def search(req: PlanRequest) -> tuple[Candidate | None, list[Candidate]]:
    """The first setting that fits, in search order, and every setting tried."""
    tried: list[Candidate] = []
    for optim in optim_order(req):
        if (e := _search_optim(req, optim, tried)) is not None:
            return e, tried
    return None, tried


def make_request(shape: ModelShape, wl: Workload, budget: float, specs: dict, optim: str,
             checkpointing: str | bool, sleep: str | bool, mb: int | None,
             util: float | None, host_gib: float | None) -> PlanRequest:
    if not budget > 0:
        raise PlanError(f"the GPU memory budget must be > 0 GiB, got {budget}")
    if optim != "auto" and optim not in specs:
        raise PlanError(f"unknown --optim {optim!r}; one of auto, {', '.join(specs)}")
    if util is not None and not 0 < util < 1:
        raise PlanError(f"--gpu_mem_util must be in (0, 1), got {util}")
    if mb is not None and mb < 1:
        raise PlanError(f"--micro_batch_tokens must be >= 1, got {mb}")
    bad = [k for k, v in wl.__dict__.items() if isinstance(v, int) and not isinstance(v, bool)
           and v < 1]
    if bad:
        raise PlanError(f"workload {bad[0]} must be >= 1, got {getattr(wl, bad[0])}")
    req = PlanRequest(shape, wl, float(budget), specs, None if optim == "auto" else optim,
                   _auto_choice(checkpointing), _auto_choice(sleep), mb, util, host_gib)
    if req.optim is not None and not req.host_fits(req.optim):
        raise PlanError(f"--optim {optim} keeps {req.host_state_gib(optim):.1f} GiB of optimizer "
                        f"state in host memory, more than {HOST_STATE_SHARE:.0%} of the host's "
                        f"{host_gib:.1f} GiB (--host_memory_gb)")
    fixed = vllm_weights_gib(shape, wl) + vllm_overhead_gib(shape, wl)
    if util is not None and util * budget < fixed:
        raise PlanError(f"--gpu_mem_util {util} gives vLLM {util * budget:.1f} GiB, less than "
                        f"its weights + overhead ({fixed:.1f} GiB); leave it unset")
    return req
