"""The conventions every entry point shares: exit statuses, one-line errors that name a fix,
what an interrupted run says, and what git keeps out of the repository."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess

import pytest
from conftest import REPO

from rlvr.config import resolve


def test_refusals_of_a_run_exit_2_in_one_line(tmp_path, capsys):
    from rlvr.run_dir import claim_or_exit
    from rlvr.run_plan import chosen_plan
    from rlvr.run_setup import load_data

    cfg = resolve({"output_dir": str(tmp_path), "exp_name": "r", "data_dir": str(tmp_path / "x"),
                   "gpu_memory_gb": None})
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{}")  # a run was here
    for refuse in (lambda: load_data(cfg), lambda: claim_or_exit(cfg.run_dir, cfg.resume),
                   lambda: chosen_plan(cfg, 100)):  # no --gpu_memory_gb and no GPU here
        with pytest.raises(SystemExit) as e:
            refuse()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "; " in err  # the cause; the fix


def _run_dir(tmp_path, step: int | None):
    cfg = resolve({"output_dir": str(tmp_path / "my runs"), "exp_name": "nsr_a"})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text("{}")
    if step is not None:
        ckpt = cfg.run_dir / "checkpoints" / f"step_{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.pt").write_bytes(b"")
    return cfg


def test_an_interrupted_run_says_how_to_continue_and_from_which_step(tmp_path, monkeypatch,
                                                                     capsys):
    import rlvr.experiment as experiment

    cfg = _run_dir(tmp_path, step=20)

    def interrupted(_cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted)
    assert experiment.main(cfg=cfg) == 130
    err = capsys.readouterr().err
    assert err == ("interrupted: continue from the step-20 checkpoint with `python "
                   f"MATH_experiment.py --output_dir '{tmp_path}/my runs' --exp_name nsr_a "
                   "--resume`\n")
    shutil.rmtree(cfg.run_dir / "checkpoints")
    assert "no checkpoint yet" in experiment.interrupted_message(cfg)
    assert "from step 0" in experiment.interrupted_message(cfg)


def test_evaluation_outputs_are_not_tracked_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("evals/Qwen2.5-0.5B-Instruct/samples.jsonl", "runs/x/metrics.jsonl",
                 "data/math_subset/train.jsonl", "results/quickstart/results.md"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert proc.returncode == 0, f"{path} is not ignored by .gitignore"


@functools.cache
def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_cli", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, fragment", [
    ("evaluate.py", ["--model_id", "m", "--n", "many"], "argument --n: invalid int value"),
    ("evaluate.py", ["--datasets", "math"], "the following arguments are required: --model_id"),
    ("data_prep.py", ["--splits", "dev"], "argument --splits: invalid choice: 'dev'"),
])
def test_every_parser_refuses_in_one_line_without_the_usage(script, argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        _script(script).build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert err.startswith(f"error: {fragment}") and f"(see {script} --help)" in err
