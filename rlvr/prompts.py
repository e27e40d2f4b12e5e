"""The one place where a MATH problem becomes a chat prompt."""

from __future__ import annotations

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
