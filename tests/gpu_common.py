"""What the GPU test modules share: their model and how they report what they measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def random_qwen_05b(tmp_root: Path) -> tuple[Path, list[str]]:
    """The Qwen2.5-0.5B shape with random weights (bench/models.py) and the texts its tokenizer
    was trained on: the MATH subset's where data/math_subset exists. These checks are about
    numerics and plumbing, so the weights need not be trained. $RLVR_MODEL_ROOT keeps the model
    between sessions (build_random_qwen reuses a saved one)."""
    from bench.models import build_random_qwen, math_texts

    texts = math_texts(REPO / "data/math_subset") or ["What is 1 + 1? The answer is 2."] * 200
    root = Path(os.environ.get("RLVR_MODEL_ROOT", tmp_root))
    return build_random_qwen("0.5B", root / "0.5B", texts), texts


def report_fixture(report: dict[str, float], env_var: str, title: str):
    """A module's autouse fixture that, once the module's tests ran, prints the numbers they put
    in `report` and writes them as JSON to the file $env_var names, if set."""

    @pytest.fixture(scope="module", autouse=True)
    def write_report():
        yield
        if os.environ.get(env_var):
            Path(os.environ[env_var]).write_text(json.dumps(report, indent=2))
        print(f"\n{title}:", json.dumps(report, indent=2))

    return write_report
