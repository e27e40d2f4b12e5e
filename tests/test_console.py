"""Third-party progress bars and harmless warnings stay out of the run log, unless debugging."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

from rlvr.console import QUIET_ENV, quiet_environment

# What a run does first: quiet the libraries, load the policy and tokenizer, decode. The
# tokenizer is switched to clean-up mode, which transformers 5.17 warns about on every BPE
# tokenizer that has it (SmolLM2's does) -- the tokenizer warning runs start with.
CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from rlvr.console import quiet_third_party
quiet_third_party()
import torch
from rlvr.modeling import load_policy, load_tokenizer
tok = load_tokenizer(sys.argv[2])
load_policy(sys.argv[2], torch.device("cpu"), False)
tok.clean_up_tokenization_spaces = True
tok.decode([70, 71, 72])
"""

NOISE = ["Loading weights", "it/s]", "%|", "[transformers]", "Ignoring clean_up", "torchao"]


def run_child(model_dir, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(model_dir)],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in QUIET_ENV}
                          | {"RLVR_DEBUG": "0"} | env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_model_load_prints_no_progress_bar_or_known_warning(tiny_model_dir, debug):
    out = run_child(tiny_model_dir, RLVR_DEBUG="1" if debug else "0")
    if debug:  # everything is kept, which also shows that this test sees the noise
        assert "Loading weights" in out and "Ignoring clean_up" in out, out
    else:
        assert [n for n in NOISE if n in out] == [], out


def test_settings_already_in_the_environment_are_kept():
    env = {"TRANSFORMERS_VERBOSITY": "info"}
    added = quiet_environment(env)
    assert env["TRANSFORMERS_VERBOSITY"] == "info" and "TRANSFORMERS_VERBOSITY" not in added
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert quiet_environment({}, debug=True) == {}
    assert quiet_environment({"RLVR_DEBUG": "1"}) == {}
