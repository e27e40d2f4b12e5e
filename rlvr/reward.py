"""Verifiable reward: pull the final answer out of a response and check it against the gold answer.

`extract_boxed` is shared with data preparation so that gold answers and model answers are
extracted by exactly the same rule.
"""

from __future__ import annotations

import re

# `\boxed` / `\fbox` not followed by another letter (so `\boxedtext` is not a box).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced_group(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None if never closed.

    Escaped braces `\\{` and `\\}` are literal characters in LaTeX and do not count towards the
    nesting depth.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, or None if there is none.

    Braces are matched with nesting (`\\boxed{\\frac{\\sqrt{3}}{2}}` gives `\\frac{\\sqrt{3}}{2}`),
    escaped braces are ignored, and the brace-less form `\\boxed 5` gives what follows up to the
    next `$` or line end. A box that is never closed counts as no box.
    """
    if not text:
        return None
    for match in reversed(list(_BOX_RE.finditer(text))):
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _balanced_group(text, pos)
            if content is not None:
                return content.strip()
            continue  # unclosed: fall back to an earlier, complete box
        if pos > match.end():  # `\boxed 5` form
            content = re.split(r"[$\n]", text[pos:], maxsplit=1)[0].strip()
            if content:
                return content
    return None
