"""What a rollout engine returns, and the interface both engines (HF and vLLM) implement.

Kept apart from the engines so that rlvr/engines.py and rlvr/vllm_engine.py share them without
importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Completion:
    token_ids: list[int]        # exactly the sampled ids, including the EOS if one was emitted
    text: str                   # decoded without special tokens, for grading
    truncated: bool             # stopped by max_tokens rather than by an EOS
    logprobs: list[float] | None = None  # the engine's post-temperature log-probs, if asked for


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
                 return_logprobs: bool = False, top_p: float = 1.0,
                 seeds: list[int] | None = None) -> list[list[Completion]]:
        """`n` completions for each prompt (token ids); temperature 0 means greedy.

        Sampling is exactly `temperature` and nucleus `top_p` (1.0 = the full distribution, as
        training needs), top-k off, no repetition penalty. `return_logprobs` asks for each sampled
        token's log-prob under that processed distribution. `seeds` (one per prompt, see
        rlvr.sampling) makes each prompt's samples depend on its seed alone, whatever else is in
        the call; without them the engine draws from its own seeded stream.
        """

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the next `generate` sample from these weights: (HF parameter name, whole tensor)
        pairs, taken one at a time (the trainer decides how each is produced: a cast copy on one
        GPU, a gather of FSDP shards issued in the same order on every rank). An engine that
        samples with the trainer's own module (HF) consumes none of them."""

    def sleep(self) -> None:
        """Release accelerator memory while the policy trains (no-op where unsupported)."""
