"""The one place where a MATH problem becomes a chat prompt."""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_MESSAGE = "You are a helpful assistant."

# "paper" is the exact instruction of Zhu et al. (2025); "default" says the same in more words.
PROMPT_STYLES = {
    "default": "{problem}\n\nSolve the problem step by step, and put your final answer within "
               "\\boxed{{}}.",
    "paper": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
}


def build_messages(problem: str, style: str = "default") -> list[dict[str, str]]:
    """System + user messages for one problem."""
    return [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": PROMPT_STYLES[style].format(problem=problem)},
    ]


def encode_prompt(tokenizer, problem: str, style: str = "default") -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant turn's opening."""
    text = tokenizer.apply_chat_template(
        build_messages(problem, style), tokenize=False, add_generation_prompt=True
    )
    # The template already holds any BOS/special tokens it wants; adding more would shift the
    # sequence away from what the model saw in instruction tuning.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Problems:
    """Problem rows and their encoded prompts, in the same order."""
    rows: list[dict]
    prompt_ids: list[list[int]]
    n_skipped: int = 0  # rows left out: prompts over max_prompt_tokens


def encode_problems(rows: list[dict], tokenizer, style: str,
                    max_prompt_tokens: int | None = None) -> Problems:
    """Every row's chat prompt (`row["problem"]`), leaving out those over `max_prompt_tokens`."""
    kept, ids, skipped = [], [], 0
    for row in rows:
        p = encode_prompt(tokenizer, row["problem"], style)
        if max_prompt_tokens is not None and len(p) > max_prompt_tokens:
            skipped += 1
            continue
        kept.append(row)
        ids.append(p)
    return Problems(kept, ids, skipped)
