"""Keep third-party progress bars and known-harmless warnings out of the run log.

A run's log should read as its own lines (set-up, one line per step, evals, errors). Left alone,
transformers draws a "Loading weights" bar for every model load (and one per GGUF conversion and
checkpoint write), warns on every SmolLM2 tokenizer about a clean-up step it skips, vLLM prints
hundreds of INFO lines per start, and an installed torchao reports kernels it cannot load.

Call `quiet_third_party()` first thing, before torch, transformers or vLLM are imported: they read
most of these settings from the environment once, at import. Settings already in the
environment are kept (the user's choice wins), and `RLVR_DEBUG=1` (or `debug=True`) changes
nothing at all. Errors are never silenced.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

DEBUG_ENV = "RLVR_DEBUG"

# Read at import by the libraries; only set where the environment does not say otherwise.
QUIET_ENV = {
    # huggingface_hub's bars, and transformers' ("Loading weights", "Writing model shards",
    # "Converting and de-quantizing GGUF tensors") which follow huggingface_hub's switch
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_VERBOSITY": "error",
    # transformers' INFO/WARNING chatter, e.g. "Ignoring clean_up_tokenization_spaces=True for
    # BPE tokenizer" on every SmolLM2 load
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # vLLM's INFO lines (config dumps, load and compile progress, cache sizes)
    "VLLM_LOGGING_LEVEL": "WARNING",
    # bars drawn with plain tqdm, which no library switch reaches (transformers' "Converting and
    # de-quantizing GGUF tensors"): tqdm reads its defaults from TQDM_* variables
    "TQDM_DISABLE": "1",
}

# Loggers with no environment switch that print known-harmless warnings at import time.
QUIET_LOGGERS = {
    "torchao": logging.ERROR,  # "Failed to load .../_C_mxfp8...so": kernels for other GPUs
    "torch.utils._pytree": logging.ERROR,  # torchao's deprecated Enum registrations
}


def debug_enabled(env: MutableMapping[str, str] = os.environ) -> bool:
    return env.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def quiet_environment(env: MutableMapping[str, str], debug: bool = False) -> dict[str, str]:
    """Set the quiet defaults in `env` where it has none; return what was set."""
    if debug or debug_enabled(env):
        return {}
    added = {k: v for k, v in QUIET_ENV.items() if k not in env}
    env.update(added)
    return added


def quiet_third_party(debug: bool = False) -> None:
    """Keep third-party progress bars and harmless warnings out of the log, unless debugging."""
    if debug or debug_enabled():
        return
    quiet_environment(os.environ)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # Already imported (called late, or from a notebook): their import-time switches are past.
    if "transformers" in sys.modules and os.environ.get("TRANSFORMERS_VERBOSITY") == "error":
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
