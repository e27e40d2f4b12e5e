"""End to end: MATH_experiment.py on the HF engine with a tiny random model, then --resume."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

REQUIRED_TAGS = [
    "train/reward_mean", "train/samples_kept", "train/loss", "train/grad_norm", "train/entropy",
    "train/clip_frac", "train/ratio_max", "train/response_len", "train/truncated_frac",
    "train/no_signal_frac", "train/skipped_prompts", "eval/pass@1", "eval/pass@1_se",
    "eval/pass@2", "time/rollout_s", "time/reward_s", "time/train_s", "time/update_s",
    "time/sync_s", "time/eval_s", "perf/tokens_per_s", "mem/peak_gb",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "MATH_experiment.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def base_args(model_dir, data_dir, out_dir) -> list[str]:
    return ["--backend", "hf", "--model_id", str(model_dir), "--objective", "W_REINFORCE",
            "--rollout_batch_size", "8", "--rollouts_per_prompt", "2", "--max_tokens", "16",
            "--eval_every", "1", "--eval_n", "2", "--eval_limit", "8", "--save_every", "1",
            "--micro_batch_tokens", "2048", "--max_prompt_tokens", "600", "--grader_workers", "1",
            "--data_dir", str(data_dir), "--output_dir", str(out_dir), "--exp_name", "e2e"]


def scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_data_dir):
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli(*base_args(tiny_model_dir, tiny_data_dir, out), "--n_train_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "e2e", proc


def test_run_writes_tags_metrics_config_and_checkpoint(finished_run):
    run_dir, proc = finished_run
    tags = scalars(run_dir)
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    assert not missing, missing
    assert sorted(tags["train/loss"]) == [1, 2]
    assert sorted(tags["eval/pass@1"]) == [0, 1, 2]  # before training, every step, final
    assert any(t.startswith("eval/pass@1/level_") for t in tags)
    assert any(t.startswith("eval/pass@1/") and "level" not in t and t != "eval/pass@1_se"
               for t in tags)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "train/loss" in ln] == [1, 2]
    # the update's own time is a positive part of the train phase
    assert all(0 < ln["time/update_s"] <= ln["time/train_s"] for ln in lines if "train/loss" in ln)
    assert lines[-1]["eval/pass@1"] == pytest.approx(tags["eval/pass@1"][2])
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["objective"] == "W_REINFORCE" and cfg["lambda_psr"] == 0.1
    assert cfg["provenance"]["packages"]["torch"] and cfg["provenance"]["device"] == "cpu"
    assert (run_dir / "checkpoints" / "step_2" / "state.pt").exists()
    assert not (run_dir / "checkpoints" / "step_1").exists()  # only the latest is kept
    assert (run_dir / "final_model" / "config.json").exists()
    assert "step 2/2" in proc.stdout and "eval summary" in proc.stdout


def test_final_model_loads_with_transformers(finished_run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(finished_run[0] / "final_model")
    assert model.config.num_hidden_layers == 2


def test_existing_run_dir_is_refused_without_resume(finished_run, tiny_model_dir, tiny_data_dir):
    run_dir, _ = finished_run
    proc = run_cli(*base_args(tiny_model_dir, tiny_data_dir, run_dir.parent),
                   "--n_train_steps", "2")
    assert proc.returncode != 0 and "already exists" in proc.stderr and "--resume" in proc.stderr


def test_resume_refuses_a_changed_training_setting(finished_run, tiny_model_dir, tiny_data_dir):
    run_dir, _ = finished_run
    proc = run_cli(*base_args(tiny_model_dir, tiny_data_dir, run_dir.parent),
                   "--n_train_steps", "3", "--lr", "1e-5", "--resume")
    assert proc.returncode != 0 and "--lr" in proc.stderr


def test_resume_continues_at_step_3_and_purges_steps_of_a_crashed_process(
        finished_run, tiny_model_dir, tiny_data_dir):
    from torch.utils.tensorboard import SummaryWriter

    run_dir, _ = finished_run
    # a process that crashed after the step-2 checkpoint had already logged a step 3
    w = SummaryWriter(str(run_dir))
    w.add_scalar("train/loss", 999.0, 3)
    w.close()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "train/loss": 999.0}) + "\n")

    proc = run_cli(*base_args(tiny_model_dir, tiny_data_dir, run_dir.parent),
                   "--n_train_steps", "3", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from step 2" in proc.stdout and "step 3/3" in proc.stdout
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "train/loss" in ln] == [1, 2, 3]
    assert all(ln.get("train/loss") != 999.0 for ln in lines)
    tags = scalars(run_dir)
    assert sorted(tags["train/loss"]) == [1, 2, 3] and tags["train/loss"][3] != 999.0
    assert sorted(tags["eval/pass@1"]) == [0, 1, 2, 3]
    assert (run_dir / "checkpoints" / "step_3" / "state.pt").exists()


def test_missing_data_is_a_one_line_error_that_names_data_prep(tmp_path, tiny_model_dir):
    proc = run_cli("--backend", "hf", "--model_id", str(tiny_model_dir), "--data_dir",
                   str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "runs"))
    assert proc.returncode != 0
    assert "data_prep.py" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_resumed_run_matches_an_uninterrupted_one(finished_run, tiny_model_dir, tiny_data_dir,
                                                  tmp_path):
    """2 steps + --resume to 3 (the test above) samples and trains exactly like 3 steps straight:
    RNG states, data position and optimizer all carry over."""
    run_dir, _ = finished_run
    if not (run_dir / "checkpoints" / "step_3").exists():  # when run on its own
        resumed = run_cli(*base_args(tiny_model_dir, tiny_data_dir, run_dir.parent),
                          "--n_train_steps", "3", "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_cli(*base_args(tiny_model_dir, tiny_data_dir, tmp_path), "--n_train_steps", "3")
    assert straight.returncode == 0, straight.stderr[-3000:]

    def step3(d):
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return next(ln for ln in lines if ln["step"] == 3 and "train/loss" in ln)

    a, b = step3(run_dir), step3(tmp_path / "e2e")
    for key in ("train/response_len", "train/entropy", "train/loss", "train/grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    cfg = json.loads((run_dir / "config.json").read_text())
    assert len(cfg["resumes"]) == 1 and cfg["provenance"]["command"] != ""


def test_resume_without_a_checkpoint_restarts_from_step_0(tmp_path, tiny_model_dir,
                                                          tiny_data_dir):
    args = [*base_args(tiny_model_dir, tiny_data_dir, tmp_path), "--n_train_steps", "1",
            "--save_every", "0", "--eval_limit", "2", "--eval_n", "1"]
    run_dir = tmp_path / "e2e"
    run_dir.mkdir()  # what a crash before the first checkpoint leaves behind
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "eval/pass@1": 0.5}\n{"step": 1, "tr')
    from rlvr.config import parse_config

    cfg = parse_config(args)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_json()))
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "restarting the run from step 0" in proc.stdout
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 1]  # eval 0, train 1, eval 1: nothing left from the crashed process


def test_bad_model_id_is_a_one_line_error_and_writes_nothing(tmp_path, tiny_data_dir):
    proc = run_cli("--backend", "hf", "--model_id", str(tmp_path / "no_such_model"),
                   "--data_dir", str(tiny_data_dir), "--output_dir", str(tmp_path / "runs"))
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: --model_id: model path ")
    assert "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_kl_entropy_truncated_is_and_two_updates_run_end_to_end(tmp_path, tiny_model_dir,
                                                                 tiny_data_dir):
    """The paths the defaults leave off: a frozen reference policy (KL), the entropy bonus, IS
    weights from the engine's own log-probs, and two mini-batches (a separate pi_old pass)."""
    args = [*base_args(tiny_model_dir, tiny_data_dir, tmp_path), "--n_train_steps", "1",
            "--save_every", "0", "--eval_limit", "2", "--eval_n", "1", "--kl_coef", "0.01",
            "--entropy_coef", "0.01", "--rollout_is", "tis", "--mini_batch_size", "4",
            "--loss_agg", "batch_token_mean"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = next(json.loads(x) for x in (tmp_path / "e2e" / "metrics.jsonl").read_text()
                .splitlines() if "train/loss" in x)
    assert step["train/n_updates"] == 2 and step["train/separate_old_logprob_pass"] == 1.0
    # the HF engine samples with the policy itself: IS weights 1 up to float noise
    assert step["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert step["train/logp_gap_max"] < 1e-3


def test_optimizer_state_is_made_after_the_engine_with_it_asleep(tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    """vLLM's start-up activations go back before the state takes its room, and the state's
    zero-gradient step runs with the engine asleep (awake, a sleeping plan's update-sized
    allocation would not fit); a weight load then wakes it, as after every update."""
    import torch

    import rlvr.optimizers
    from rlvr import run_setup
    from rlvr.config import resolve

    events: list[str] = []
    build, make = run_setup.build_engine, rlvr.optimizers.make_optimizer

    def recording_engine(*a, **kw):
        engine = build(*a, **kw)
        events.append("engine")
        sleep, load = engine.sleep, engine.load_weights
        monkeypatch.setattr(engine, "sleep", lambda: (events.append("sleep"), sleep())[1])
        monkeypatch.setattr(engine, "load_weights",
                            lambda w: (events.append("sync"), load(w))[1])
        return engine

    monkeypatch.setattr(run_setup, "build_engine", recording_engine)
    monkeypatch.setattr(rlvr.optimizers, "make_optimizer",
                        lambda *a, **kw: (events.append("optimizer"), make(*a, **kw))[1])
    cfg = resolve({"model_id": str(tiny_model_dir), "backend": "hf",
                   "output_dir": str(tmp_path)})
    for sleep_mode, expected in ((True, ["engine", "sleep", "optimizer", "sync"]),
                                 (False, ["engine", "sleep", "optimizer"])):
        events.clear()
        mem = run_setup.Resolved("adamw", False, 4096, sleep_mode)
        models = run_setup.load_models(cfg, torch.device("cpu"), mem)
        policy, optimizer = models.policy, models.optimizer
        assert events == expected
        assert all(optimizer.state[p] for p in policy.parameters())  # the state exists


def test_compile_on_cpu_says_it_runs_eager(capsys):
    import torch

    from rlvr.run_setup import compile_policy

    compile_policy(None, torch.device("cpu"))  # returns before touching the model
    assert "--compile applies on a CUDA GPU only; running eager" in capsys.readouterr().out
