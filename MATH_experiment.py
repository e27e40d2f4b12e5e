#!/usr/bin/env python
"""Train a Qwen2.5-Instruct model on MATH with NSR, PSR, W-REINFORCE, REINFORCE or GRPO.

    python MATH_experiment.py --objective NSR --model_id Qwen/Qwen2.5-0.5B-Instruct

`python MATH_experiment.py --help` lists every option with its default. The loop itself is in
rlvr/experiment.py.
"""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: the grader's spawned workers re-import this file as
    # __mp_main__, and should not pay for torch and transformers. The flags are checked before
    # torch is imported at all, so a bad one is a one-line error at once. Third-party progress
    # bars and known-harmless warnings are switched off before those libraries read their settings.
    from rlvr.console import quiet_third_party

    quiet_third_party(debug="--debug" in sys.argv[1:])
    from rlvr.config import parse_config

    cfg = parse_config()
    from rlvr.experiment import main

    sys.exit(main(cfg=cfg))
