"""Run logging on resume: metrics.jsonl keeps exactly the steps up to the checkpoint."""

import json

from rlvr.tracking import RunLogger


def test_resume_truncates_metrics_after_the_checkpoint_and_drops_a_torn_line(tmp_path):
    lines = [{"step": 0, "eval/pass@1": 0.1}, {"step": 1, "train/loss": 0.5},
             {"step": 2, "train/loss": 0.4}, {"step": 3, "train/loss": 0.3}]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "train/lo'  # crash mid-write
    (tmp_path / "metrics.jsonl").write_text(text)
    logger = RunLogger(tmp_path, resume_step=2)
    logger.log(3, {"train/loss": 0.25})
    logger.close()
    kept = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in kept] == [0, 1, 2, 3]
    assert kept[-1]["train/loss"] == 0.25
