"""A stand-in for MATH_experiment.py in the launcher's tests: it keeps the run-directory protocol
with the real rlvr.run_dir (claim, READY, metrics.jsonl, DONE) but trains nothing, so the
launcher's packing, staggering, retries and stopping can be tested in a fraction of a second.

    python tests/standin_run.py --output_dir D --exp_name N [--ready_after S] [--run_for S]
        [--fail_times K] [--record FILE] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlvr.run_dir import claim_run_dir  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--exp_name", required=True)
    p.add_argument("--ready_after", type=float, default=0.0)
    p.add_argument("--run_for", type=float, default=0.0)
    p.add_argument("--fail_times", type=int, default=0)
    p.add_argument("--record", type=Path)
    p.add_argument("--resume", action="store_true")
    a, _ = p.parse_known_args()
    run_dir = a.output_dir / a.exp_name
    event = {"name": a.exp_name, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "resume": a.resume, "start": time.time()}
    claim = claim_run_dir(run_dir, a.resume)
    try:
        (run_dir / "config.json").write_text(json.dumps({"n_train_steps": 1}))
        time.sleep(a.ready_after)
        claim.mark_ready()
        event["ready"] = time.time()
        time.sleep(a.run_for)
        failures = run_dir / "failures"
        n = int(failures.read_text()) if failures.exists() else 0
        if n < a.fail_times:
            failures.write_text(str(n + 1))
            print(f"standin {a.exp_name}: failing on purpose ({n + 1}/{a.fail_times})")
            return 1
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 1, "train/reward_mean": 0.5, "time/step_s": 0.1}) + "\n")
        claim.mark_done(1)
        event["end"] = time.time()
        return 0
    except KeyboardInterrupt:
        event["interrupted"] = time.time()
        return 130
    finally:
        claim.release()
        if a.record:
            with open(a.record, "a") as f:
                f.write(json.dumps(event) + "\n")


if __name__ == "__main__":
    sys.exit(main())
