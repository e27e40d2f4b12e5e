"""vLLM rollout engine colocated with the HF policy on its GPU (vLLM 0.25, V1 engine in-process).

Weights are pushed in place through `collective_rpc` (same process, no serialisation, no disk), and
the prefix cache is reset after every push: KV blocks computed with the old weights would otherwise
be served to the new policy. With `--vllm_sleep`, the engine drops weights and KV cache (level 2)
while the policy trains and wakes in the order weights -> load -> KV cache.

In a torchrun job every rank runs its own engine on its GPU (vLLM's `external_launcher`: it joins
the job's process group instead of starting workers). With `tensor_parallel` = t > 1, t consecutive
ranks share one engine sharded over their GPUs; vLLM then needs each of them to submit the same
requests, so they pool their prompts, all generate the pool, and each keeps its own part (an eval
part they were all given alike is generated once).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import torch

from rlvr.rollout import Completion

# Must be set before vllm is imported: the in-process engine is what makes the model reachable
# for the in-place weight push. The FlashInfer sampler is not available on the device here.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


VLLM_DEFAULT_MAX_GRAPH = 512


def pin_triton_cache_dir(environ=os.environ) -> str:
    """Fix Triton's cache directory for the process before vLLM starts (a user's own is kept).

    Left unset, it is whatever the first compile makes it: when vLLM compiles the model (a new
    model or config), inductor points it into that compile's directory; when vLLM loads the
    compiled model from its cache, it stays Triton's default. vLLM's V2 runner JIT-compiles its
    sampling kernels at every start, so the start after each new compile compiled all of them
    again (seconds of start-up, docs/PERFORMANCE.md). Triton's own default path.
    Called as vLLM starts (VLLMEngine), where its compiles happen; inductor sets the variable
    when unset, so a compile earlier in the process would keep its own directory."""
    home = environ.get("TRITON_HOME") or os.path.expanduser("~")
    return environ.setdefault("TRITON_CACHE_DIR", os.path.join(home, ".triton", "cache"))


def _load_weights_on_worker(worker, weights):
    """Runs inside the engine's worker (same process): copy tensors into the model in place."""
    worker.get_model().load_weights(weights)


class VLLMEngine:
    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, eos_ids: list[int], *, max_model_len: int,
                 seed: int, max_num_seqs: int = 512, sleep_mode: bool = False,
                 kv_cache_bytes: int | None = None, gpu_mem_util: float | None = None,
                 tensor_parallel: int = 1, distributed: bool = False):
        """`kv_cache_bytes` sizes the KV cache exactly (the memory plan's figure, per GPU);
        without it vLLM takes `gpu_mem_util` of the card for weights + KV cache (0.9 when neither
        is given). `distributed`: one engine per rank of the torchrun job that has already joined
        its process group; `seed` is then this engine's own (base seed + data-parallel rank, the
        same on the ranks of a tensor-parallel group, which must sample alike)."""
        pin_triton_cache_dir()
        from vllm import LLM

        from rlvr import dist

        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.sleep_mode = sleep_mode
        self.asleep = False
        # With an explicit KV size vLLM ignores gpu_memory_utilization for sizing but still
        # refuses to start unless that share of the card is free: the policy already holds its
        # share (and other runs may share the card), so ask for a token share.
        memory = ({"kv_cache_memory_bytes": int(kv_cache_bytes), "gpu_memory_utilization": 0.01}
                  if kv_cache_bytes else {"gpu_memory_utilization": gpu_mem_util or 0.9})
        launch = {}
        if distributed:
            launch = {"distributed_executor_backend": "external_launcher",
                      "tensor_parallel_size": tensor_parallel}
        # made before vLLM's own groups, in the same order on every rank
        self.tp_group = dist.tensor_parallel_group(tensor_parallel) if distributed else None
        # vLLM captures CUDA graphs up to min(2 x max_num_seqs, 512) sequences and decodes
        # bigger batches without them: an engine allowed more (the concurrent eval's) gets
        # graphs up to its own limit
        if max_num_seqs > VLLM_DEFAULT_MAX_GRAPH:
            launch["compilation_config"] = {"max_cudagraph_capture_size": max_num_seqs}
        self.llm = LLM(
            model=model_dir, dtype="bfloat16", enable_prefix_caching=True,
            enable_sleep_mode=sleep_mode, max_model_len=max_model_len, seed=seed,
            max_num_seqs=max_num_seqs, **memory,
            # the checkpoint's generation_config (top_k 20, top_p 0.8, ...) must not become the
            # default sampling parameters
            generation_config="vllm",
            # log-probs of the distribution actually sampled from (after temperature)
            logprobs_mode="processed_logprobs",
            **launch,
        )
        self.last_sync_s = 0.0

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 return_logprobs: bool = False, top_p: float = 1.0,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        from rlvr import dist

        self._wake()
        mine, offset = len(prompts), 0
        if self.tp_group is not None:  # the group's pool, in group-rank order (see module doc)
            prompts, seeds, offset = dist.pool_in_group((prompts, seeds), self.tp_group)
        greedy = temperature == 0
        params = dict(
            n=n, temperature=0.0 if greedy else temperature, top_p=top_p, top_k=0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=max_tokens, stop_token_ids=self.eos_ids, skip_special_tokens=True,
            logprobs=0 if return_logprobs else None,
            # vLLM would detokenise incrementally at every decode step, in the engine's own
            # thread; one batch decode of the final ids gives the same text
            detokenize=False,
        )
        # one request per prompt with its own seed (sample j draws with seed + j), or the
        # engine's own stream where the caller names no seeds
        sp = (SamplingParams(**params) if seeds is None or greedy
              else [SamplingParams(**params, seed=s) for s in seeds])
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        ids = [list(o.token_ids) for out in outs for o in out.outputs]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        flat = []
        for o, toks, text in zip((o for out in outs for o in out.outputs), ids, texts):
            lps = None
            if return_logprobs and o.logprobs is not None:
                lps = [step[t].logprob for step, t in zip(o.logprobs, toks)]
            flat.append(Completion(token_ids=toks, text=text,
                                   truncated=o.finish_reason == "length", logprobs=lps))
        return [flat[i * n:(i + 1) * n] for i in range(offset, offset + mine)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        if self.asleep:
            # Hand the blocks the policy's activations left in torch's cache back to the driver:
            # vLLM wakes up in its own allocator and cannot reuse them, and the two together can
            # exceed the card (docs/PERFORMANCE.md). Only in sleep mode, once a step.
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        # HF parameter names, which vLLM's loader maps (and, tensor-parallel, slices). Passed as
        # the iterator it is: in-process the RPC hands it over unpickled and the loader takes one
        # tensor at a time, so at most one copy of a weight is alive at once (a list would hold a
        # second copy of the model).
        self.llm.collective_rpc(_load_weights_on_worker, args=(iter(weights),))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        # KV blocks computed with the old weights must never serve the new policy. vLLM refuses
        # (False) while any block is still held by a request; none should be after generate().
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        torch.cuda.synchronize()
        self.last_sync_s = time.perf_counter() - t0

    def sleep(self) -> None:
        if self.sleep_mode and not self.asleep:
            # level 2 drops the weights too: the next sync rewrites all of them anyway
            self.llm.sleep(level=2)
            self.asleep = True

    def _wake(self) -> None:
        # level-2 sleep discarded the weights: generating before a sync would use garbage
        if self.asleep:
            raise RuntimeError("vLLM engine asleep without a weight sync; call load_weights first")
