"""The memory plan of a run: `plan_memory` runs the search (rlvr/memory_search.py) over the cost
model (rlvr/memory.py), then words why the plan is what it is, or why no plan fits
(rlvr/memory_notes.py); `MemoryPlan` is what it returns and prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlvr.memory import (
    GIB,
    ModelShape,
    PlanError,
    Workload,
    default_optim_specs,
    eval_engine_kv_tokens,
    kv_bytes_per_rank_token,
)
from rlvr.memory_notes import plan_notes, refusal_message
from rlvr.memory_search import Candidate, PlanRequest, make_request, search


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen settings and the predicted GPU memory of each phase (GiB).

    `rollout_gib`/`train_gib` hold every component (weights, grads, optimizer, autocast,
    activations, logits, reference, vllm_weights, kv_cache, vllm_overhead, context,
    fragmentation). `kv_cache_bytes` is vLLM's `kv_cache_memory_bytes`; with the expert override
    `gpu_mem_util` it is None and vLLM gets `vllm_share_gib` instead.
    """
    optim: str
    optim_exact: bool
    gradient_checkpointing: bool
    sleep: bool
    micro_batch_tokens: int
    kv_cache_tokens: int | None
    kv_cache_bytes: int | None
    gpu_mem_util: float | None
    vllm_share_gib: float
    rollout_gib: dict[str, float]
    train_gib: dict[str, float]
    rollout_peak_gib: float
    train_peak_gib: float
    planned_peak_gib: float
    budget_gib: float
    headroom_gib: float
    cpu_gib: float  # optimizer state kept in host memory (adamw_offload)
    notes: tuple[str, ...]
    # how many concurrent eval engines, and each one's decode concurrency and
    # kv_cache_memory_bytes (None: evals on the rollout engine)
    eval_engine_seqs: int | None = None
    eval_kv_cache_bytes: int | None = None
    eval_engines: int = 1

    def to_dict(self) -> dict:
        """JSON-safe, for config.json."""
        out = {}
        for k, v in self.__dict__.items():
            if isinstance(v, float):
                v = round(v, 3)
            elif isinstance(v, dict):
                v = {name: round(x, 3) for name, x in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out

    def vllm_memory_utilization(self, card_gib: float) -> float:
        """vLLM's gpu_memory_utilization for the override: its share is of the whole card."""
        return self.vllm_share_gib / card_gib

    def format_table(self) -> str:
        """One short table (<= 16 lines, < 100 columns) for the start of a run."""
        return _format_table(self)


def plan_memory(shape: ModelShape, workload: Workload, budget_gib: float, *, optim: str = "auto",
                gradient_checkpointing: str | bool = "auto", sleep: str | bool = "auto",
                micro_batch_tokens: int | None = None, gpu_mem_util: float | None = None,
                host_gib: float | None = None, optim_specs: dict | None = None) -> MemoryPlan:
    """The plan for one run on a `budget_gib` GiB GPU budget (the card's total or the user's
    --gpu_memory_gb), or PlanError with one line naming the budget it needs and what would fit.

    "auto" choices are searched in this order, the first that fits wins: as asked (vLLM awake,
    checkpointing off if a micro-batch's activations are <= NO_CKPT_MAX_ACTIVATION_SHARE of the
    budget, DEFAULT_MICRO_BATCH_TOKENS), then vLLM sleep, checkpointing, micro-batches halved
    down to one longest sequence, a KV cache below the eval's need; then the next optimizer of
    AUTO_OPTIM_ORDER. Values given (True/False, "true"/"false", a name, a number) are kept.
    `gpu_mem_util` (expert override) gives vLLM that share of the budget instead of a sized KV
    cache. An optimizer whose host-memory state exceeds HOST_STATE_SHARE of `host_gib` (None:
    unlimited) is not chosen, and refused if given. `optim_specs` defaults to
    rlvr.optimizers.OPTIMIZERS.
    """
    specs = optim_specs if optim_specs is not None else default_optim_specs()
    req = make_request(shape, workload, budget_gib, specs, optim, gradient_checkpointing, sleep,
                       micro_batch_tokens, gpu_mem_util, host_gib)
    best, tried = search(req)
    if best is None:
        raise PlanError(refusal_message(req))
    return _make_plan(req, best, plan_notes(req, best, tried))


def _make_plan(req: PlanRequest, e: Candidate, notes: list[str]) -> MemoryPlan:
    s, spec = e.setting, req.specs[e.setting.optim]
    rollout, train = sum(e.rollout.values()), sum(e.train.values())
    peak = max(rollout, train)
    kv_bytes = (None if e.kv_tokens is None
                else int(e.kv_tokens * kv_bytes_per_rank_token(req.shape, req.wl)))
    share = e.rollout["vllm_weights"] + e.rollout["kv_cache"] + e.rollout["vllm_overhead"]
    return MemoryPlan(
        optim=s.optim, optim_exact=bool(spec.exact), gradient_checkpointing=s.checkpointing,
        sleep=s.sleep, micro_batch_tokens=s.micro_batch_tokens, kv_cache_tokens=e.kv_tokens,
        kv_cache_bytes=kv_bytes, gpu_mem_util=req.gpu_mem_util, vllm_share_gib=share,
        rollout_gib=dict(e.rollout), train_gib=dict(e.train), rollout_peak_gib=rollout,
        train_peak_gib=train, planned_peak_gib=peak, budget_gib=req.budget,
        headroom_gib=req.budget - peak, cpu_gib=req.shape.n_params * spec.cpu_bytes / GIB,
        notes=tuple(notes), eval_engine_seqs=req.wl.eval_engine_seqs,
        eval_engines=req.wl.eval_engines if req.wl.eval_engine_seqs else 1,
        eval_kv_cache_bytes=(eval_engine_kv_tokens(req.wl) * req.shape.kv_bytes_per_token
                             if req.wl.eval_engine_seqs else None))


_ROWS = (  # label, components added up
    ("policy weights ({dtype})", ("weights",)),
    ("bf16 weight copies (autocast, FSDP gathers)", ("autocast",)),
    ("gradients", ("grads",)),
    ("optimizer state ({optim})", ("optimizer",)),
    ("activations ({mb:,}-token micro-batch{ckpt})", ("activations",)),
    ("logits (fp32 chunks)", ("logits",)),
    ("reference model (bf16)", ("reference",)),
    ("vLLM weights (bf16)", ("vllm_weights",)),
    ("vLLM KV cache{kv}", ("kv_cache",)),
    ("vLLM overhead (graphs, sampler)", ("vllm_overhead",)),
    ("vLLM start-up, above optimizer state", ("vllm_startup",)),
    ("CUDA context + fragmentation", ("context", "fragmentation")),
    ("engine processes (eval engines, transfer buffer)", ("engine_processes",)),
)


def _format_table(p: MemoryPlan) -> str:
    # fp32 masters are exactly the ones autocast makes bf16 copies of
    fields = {"dtype": "fp32" if p.train_gib["autocast"] else "bf16", "optim": p.optim,
              "mb": p.micro_batch_tokens, "ckpt": ", ckpt" if p.gradient_checkpointing else "",
              "kv": f" ({p.kv_cache_tokens:,} tokens)" if p.kv_cache_tokens else ""}

    def cell(x: float) -> str:
        return f"{x:9.2f}" if x > 0.005 else f"{'-':>9}"

    lines = [f"{'GPU memory plan, GiB (budget ' + format(p.budget_gib, '.1f') + ')':<50}"
             f"{'rollout/eval':>13}{'train':>9}"]
    for label, keys in _ROWS:
        r, t = (sum(d.get(k, 0.0) for k in keys) for d in (p.rollout_gib, p.train_gib))
        if keys == ("engine_processes",) and not r:  # a row only for runs that have them
            continue
        lines.append(f"  {label.format(**fields):<52}{cell(r)}{cell(t)}")
    lines.append(f"  {'phase total':<52}{cell(p.rollout_peak_gib)}{cell(p.train_peak_gib)}")
    lines.append(f"planned peak {p.planned_peak_gib:.1f} GiB, headroom {p.headroom_gib:.1f} GiB"
                 + (f", optimizer state in host memory {p.cpu_gib:.1f} GiB" if p.cpu_gib else ""))
    kv = (f"KV {p.kv_cache_bytes / GIB:.2f} GiB" if p.kv_cache_bytes is not None
          else f"vLLM share {p.vllm_share_gib:.1f} GiB")
    if p.eval_engine_seqs:
        many = f"{p.eval_engines} eval engines x" if p.eval_engines > 1 else "eval engine"
        kv += (f" | {many} {p.eval_engine_seqs} seqs, KV "
               f"{p.eval_kv_cache_bytes / GIB:.2f} GiB")
    lines.append(f"{p.optim} ({'exact' if p.optim_exact else 'not exact'}) | ckpt "
                 f"{'on' if p.gradient_checkpointing else 'off'} | vLLM sleep "
                 f"{'on' if p.sleep else 'off'} | micro-batch {p.micro_batch_tokens:,} | {kv}")
    return "\n".join(lines)
