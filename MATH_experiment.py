#!/usr/bin/env python
"""Train a Qwen2.5-Instruct model on MATH with NSR, PSR, W-REINFORCE, REINFORCE or GRPO.

    python MATH_experiment.py --objective NSR --model_id Qwen/Qwen2.5-0.5B-Instruct

`python MATH_experiment.py --help` lists every option with its default. The loop itself is in
rlvr/experiment.py.
"""

import sys

from rlvr.experiment import main

if __name__ == "__main__":
    sys.exit(main())
