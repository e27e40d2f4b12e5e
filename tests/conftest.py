"""Shared fixtures: where the reference MATH data lives (outside the repo, never copied in)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MATH_DIR = REPO.parent / "shared/data/MATH"
sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, tests/gpu_common.py
sys.path.insert(0, str(REPO))  # bench/models.py


@pytest.fixture(scope="session")
def math_dir() -> Path:
    """The full MATH dataset in the hub's row format; tests that need it skip without it."""
    if not (MATH_DIR / "train.jsonl").is_file() or not (MATH_DIR / "test.jsonl").is_file():
        pytest.skip(f"full MATH data not found at {MATH_DIR} (expected train.jsonl, test.jsonl)")
    return MATH_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 chat model with a byte-level tokenizer (built offline)."""
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def random_qwen_05b(tmp_path_factory) -> tuple[Path, list[str]]:
    """The GPU tests' model directory and tokenizer texts (gpu_common.random_qwen_05b), built
    once per session for all GPU test modules."""
    from gpu_common import random_qwen_05b

    return random_qwen_05b(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory, math_dir) -> Path:
    """A 2% stratified subset of MATH written by data_prep.py (150 train / 100 test problems)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("math_subset")
    subprocess.run([sys.executable, str(REPO / "data_prep.py"), "--source", str(math_dir),
                    "--output_dir", str(out), "--fraction", "0.02"], check=True,
                   capture_output=True, cwd=REPO)
    return out
