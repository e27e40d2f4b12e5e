"""Presets, explicit flags, --resume with the saved settings, and one-line errors for bad flags."""

import json
import subprocess
import sys
import time

import pytest
from conftest import REPO

from rlvr.config import OPTIM_CHOICES, PRESETS, Config, build_parser, parse_config, resolve


def test_the_seed_preset_is_the_dataclass_defaults_and_matches_the_published_study():
    cfg = parse_config([])
    assert cfg == Config()
    assert (cfg.n_train_steps, cfg.prompts_per_step, cfg.rollouts_per_prompt) == (80, 32, 2)
    assert (cfg.max_tokens, cfg.lr, cfg.clip_range, cfg.temperature) == (512, 1e-6, 0.2, 1.0)
    assert cfg.mini_batch == cfg.rollout_batch_size  # one update per step
    # the paper's defaults where the seed study did not say otherwise
    assert cfg.prompt_style == "paper" and cfg.adam_betas == (0.9, 0.999)
    assert (cfg.entropy_coef, cfg.kl_coef, cfg.rollout_is, cfg.loss_agg) == (0.0, 0.0, "none",
                                                                             "paper")


def test_the_paper_preset_resolves_to_the_papers_run():
    cfg = parse_config(["--preset", "paper"])
    assert cfg.preset == "paper"
    assert (cfg.prompts_per_step, cfg.rollouts_per_prompt) == (1024, 8)
    assert cfg.rollout_batch_size // cfg.mini_batch == 4  # four updates per step
    assert (cfg.max_tokens, cfg.lr, cfg.clip_range, cfg.temperature) == (3072, 1e-6, 0.2, 1.0)
    assert cfg.adam_betas == (0.9, 0.999) and cfg.entropy_coef == 0.001
    assert (cfg.eval_temperature, cfg.eval_max_tokens, cfg.eval_every) == (0.0, 3072, 7)


def test_explicit_flags_override_the_preset():
    cfg = parse_config(["--preset", "paper", "--max_tokens", "1024", "--entropy_coef", "0"])
    assert cfg.max_tokens == 1024 and cfg.entropy_coef == 0.0
    assert cfg.rollout_batch_size == PRESETS["paper"]["rollout_batch_size"]


def test_help_shows_defaults_and_the_paper_values_once():
    text = " ".join(build_parser().format_help().split())
    assert "max new tokens per rollout (default: 512; paper preset: 3072)" in text
    assert "(default: None)" not in text and text.count("(default:") >= 30
    assert "--adam_betas B1 B2" in text


def test_optim_choices_match_the_optimizers_module():
    from rlvr.optimizers import OPTIMIZERS

    assert set(OPTIM_CHOICES) == {"auto", *OPTIMIZERS}


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "MATH_experiment.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("flags,fragment", [
    (["--rollouts_per_prompt", "0"], "--rollouts_per_prompt must be >= 1"),
    (["--micro_batch_tokens", "0"], "--micro_batch_tokens must be >= 1"),
    (["--lr=-1e-6"], "--lr must be > 0"),
    (["--eval_limit", "0"], "--eval_limit must be >= 1"),
    (["--eval_top_p", "1.5"], "--eval_top_p"),
    (["--rollout_batch_size", "64", "--mini_batch_size", "48"], "multiple of --mini_batch_size"),
    (["--adam_betas", "0.9", "1.0"], "--adam_betas"),
    (["--gpu_memory_gb", "-3"], "--gpu_memory_gb must be > 0"),
    (["--host_memory_gb", "0"], "--host_memory_gb must be > 0"),
    (["--async_rollout", "--concurrent_eval", "false"], "drop --concurrent_eval false"),
])
def test_bad_flags_are_one_line_errors_before_anything_loads(tmp_path, flags, fragment):
    t0 = time.perf_counter()
    proc = run_cli(*flags, "--output_dir", str(tmp_path / "runs"))
    assert time.perf_counter() - t0 < 5
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert fragment in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_backend_vllm_without_cuda_or_vllm_is_a_one_line_error(tmp_path):
    proc = run_cli("--backend", "vllm", "--output_dir", str(tmp_path / "runs"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--backend vllm needs" in proc.stderr


def saved_run(tmp_path, **overrides) -> dict:
    cfg = resolve({"output_dir": str(tmp_path), "exp_name": "r", "eval_every": 5, "lr": 2e-6,
                   **overrides})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(json.dumps({**cfg.to_json(), "provenance": {}}))
    return cfg.to_json()


def test_resume_needs_only_the_run_name_and_keeps_every_saved_setting(tmp_path):
    saved = saved_run(tmp_path, objective="PSR", max_tokens=256)
    cfg = parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume"])
    assert cfg.resume and cfg.objective == "PSR" and cfg.max_tokens == 256 and cfg.lr == 2e-6
    # a forgotten eval flag keeps the saved value instead of silently switching the eval
    assert cfg.eval_every == saved["eval_every"] == 5


def test_resume_applies_resumable_flags_and_refuses_the_others(tmp_path, capsys):
    saved_run(tmp_path)
    cfg = parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume",
                        "--n_train_steps", "100", "--eval_every", "20"])
    assert (cfg.n_train_steps, cfg.eval_every) == (100, 20)
    # giving a non-resumable flag its saved value is fine; changing it is not
    parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume", "--lr", "2e-6"])
    with pytest.raises(SystemExit) as e:
        parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume",
                      "--lr", "1e-5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and "--lr 2e-06 -> 1e-05" in err
    assert len(err.strip().splitlines()) == 1


def test_the_eta_counts_the_evals_still_to_come_at_their_measured_time():
    from rlvr.experiment import Eta

    eta = Eta(resolve({"n_train_steps": 80, "eval_every": 10}), step=0)
    eta.steps, eta.evals = [2.0, 2.0], [10.0]  # two steps, the step-0 eval
    # after step 5: 75 steps x 2 s + evals at 10, 20, ..., 80 (8) x 10 s
    assert eta.remaining_evals(5) == 8
    assert eta.minutes(5) == pytest.approx((75 * 2.0 + 8 * 10.0) / 60)
    # the last step is always evaluated, on the cadence or not
    eta = Eta(resolve({"n_train_steps": 25, "eval_every": 10}), step=0)
    assert eta.remaining_evals(20) == 1 and eta.remaining_evals(19) == 2


def test_resume_accepts_the_run_name_the_run_was_given_by_default(tmp_path):
    cfg = resolve({"output_dir": str(tmp_path), "objective": "PSR"})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
    assert cfg.exp_name is None
    got = parse_config(["--output_dir", str(tmp_path), "--exp_name", cfg.run_name, "--resume"])
    assert got.objective == "PSR" and got.run_dir == cfg.run_dir


def test_resume_refuses_a_config_written_before_its_settings_existed(tmp_path, capsys):
    saved = saved_run(tmp_path)
    for key in ("loss_agg", "adam_betas"):  # what a config.json of the previous version lacks
        saved.pop(key)
    (tmp_path / "r" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit):
        parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume"])
    assert "older version" in capsys.readouterr().err


def test_switches_of_one_invocation_are_not_carried_into_a_resume(tmp_path):
    saved_run(tmp_path, debug=True, compile=True)
    cfg = parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume"])
    assert cfg.debug is False and cfg.dry_run is False and cfg.compile is False
    assert parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume",
                         "--compile"]).compile is True


def test_a_resumed_run_keeps_the_optimizer_its_checkpoint_was_written_by(tmp_path,
                                                                        tiny_model_dir):
    """--optim auto re-plans on resume, possibly for another card or budget; the optimizer must
    stay the one whose state the checkpoint holds."""
    from rlvr.run_plan import plan_for

    fresh = resolve({"output_dir": str(tmp_path), "exp_name": "r", "model_id":
                     str(tiny_model_dir), "gpu_memory_gb": 80})
    assert plan_for(fresh, 100).optim == "adamw"
    fresh.run_dir.mkdir(parents=True)
    (fresh.run_dir / "config.json").write_text(json.dumps(
        {**fresh.to_json(), "memory_plan": {"optim": "adamw_kahan"}}))
    resumed = parse_config(["--output_dir", str(tmp_path), "--exp_name", "r", "--resume"])
    assert plan_for(resumed, 100).optim == "adamw_kahan"


def test_a_bad_choice_is_one_line_naming_the_choices_without_the_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--objective", "nsr"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: argument --objective: invalid choice: 'nsr'")
    assert "'NSR'" in err and "MATH_experiment.py --help" in err and "usage:" not in err


def test_a_greedy_eval_with_several_samples_is_refused_and_the_paper_preset_asks_for_one(
        capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--eval_temperature", "0", "--eval_n", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--eval_temperature 0 is greedy" in err and "pass --eval_n 1" in err
    cfg = parse_config(["--preset", "paper"])
    assert (cfg.eval_temperature, cfg.eval_n) == (0.0, 1)  # what config.json records is run
    assert parse_config(["--eval_temperature", "0", "--eval_n", "1"]).eval_n == 1


def test_the_eta_of_a_resumed_run_counts_its_evals_from_the_eval_history():
    from rlvr.experiment import Eta, history_eval_seconds

    cfg = resolve({"n_train_steps": 80, "eval_every": 10})
    history = [(0, {"pass@1": 0.1, "time/eval_s": 30.0}), (10, {"pass@1": 0.2,
                                                                 "time/eval_s": 40.0})]
    eta = Eta(cfg, step=10, eval_s=history_eval_seconds(history))
    eta.steps = [2.0]  # the first step after the resume
    # after step 11: 69 steps x 2 s + evals at 20, 30, ..., 80 (7) x 35 s
    assert eta.minutes(11) == pytest.approx((69 * 2.0 + 7 * 35.0) / 60)
