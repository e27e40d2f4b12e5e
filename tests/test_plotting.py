"""plot_results.py / rlvr.plotting: read real TensorBoard logs, aggregate seeds, draw, tabulate.

Running this file directly writes the realistic synthetic demo log set used to preview the figures:
    python tests/test_plotting.py /tmp/demo_runs
    python plot_results.py --logdir /tmp/demo_runs --out /tmp/plots_preview
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo is not installed; make `rlvr` importable either way

import plot_results  # noqa: E402
from rlvr import plotting, results  # noqa: E402
from rlvr.results import Stat  # noqa: E402

OUTPUTS = [*plotting.FIGURES, "results.md"]


def write_run(logdir: Path, name: str, evals: dict[int, dict[str, float]], config: dict | None,
              t0: float = 1_000.0, metrics_file: bool = True) -> Path:
    """One run as the training script writes it: TensorBoard scalars, the same scalars as lines
    of metrics.jsonl (appended, as a resumed run does), and config.json."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = logdir / name
    w = SummaryWriter(log_dir=str(run_dir))
    for step, tags in sorted(evals.items()):
        for tag, v in tags.items():
            w.add_scalar(tag, v, step, walltime=t0 + step)
    w.close()
    if metrics_file:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.writelines(json.dumps({"step": step, **tags}) + "\n"
                         for step, tags in sorted(evals.items()))
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def cfg(model_id: str, objective: str, seed: int, lam: float = 0.1) -> dict:
    return {"model_id": model_id, "objective": objective, "lambda_psr": lam, "seed": seed,
            "n_train_steps": 4, "eval_every": 2, "eval_n": 4, "provenance": {"git": "abc"}}


def ev(p1: float, se: float = 0.01, p2: float | None = None, p4: float | None = None) -> dict:
    tags = {"eval/pass@1": p1, "eval/pass@1_se": se, "eval/n_problems": 100.0}
    tags.update({"eval/pass@2": p2} if p2 is not None else {})
    tags.update({"eval/pass@4": p4} if p4 is not None else {})
    return tags


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runs")
    a = "org/Tiny-0.5B"
    write_run(d, "a_nsr_s1", {0: ev(0.20, 0.02, 0.30, 0.40), 2: ev(0.25),
                              4: ev(0.30, 0.03, 0.45, 0.60)}, cfg(a, "NSR", 1))
    write_run(d, "a_nsr_s2", {0: ev(0.22, 0.02, 0.32, 0.42), 2: ev(0.27),
                              4: ev(0.40, 0.03, 0.55, 0.66)}, cfg(a, "NSR", 2))
    write_run(d, "a_psr_s1", {0: ev(0.20), 2: ev(0.26), 4: ev(0.33, 0.025)}, cfg(a, "PSR", 1))
    write_run(d, "a_wr_s1", {0: ev(0.18), 4: ev(0.31, 0.02)}, cfg(a, "W_REINFORCE", 1, lam=0.1))
    # Step 2 logged twice (TensorBoard only, no restart marker): the later wall time must win.
    b = "/models/local/Tiny-1.5B/"
    write_run(d, "b_nsr_s1", {0: ev(0.50, 0.04), 2: ev(0.10)}, cfg(b, "NSR", 1), t0=1_000.0,
              metrics_file=False)
    write_run(d, "b_nsr_s1", {2: ev(0.55, 0.04), 4: ev(0.60, 0.05)}, None, t0=2_000.0,
              metrics_file=False)
    write_run(d, "no_eval_tags", {1: {"train/loss": 0.5}}, cfg(a, "GRPO", 1))
    write_run(d, "no_config", {0: ev(0.9)}, None)
    (d / "not_a_run").mkdir()  # neither config nor events: ignored silently
    return d


@pytest.fixture(scope="module")
def loaded(logdir: Path):
    return results.read_runs(logdir)


def test_read_runs_reports_and_skips_bad_runs(loaded) -> None:
    runs, skipped, warnings = loaded
    assert sorted(r.name for r in runs) == ["a_nsr_s1", "a_nsr_s2", "a_psr_s1", "a_wr_s1",
                                           "b_nsr_s1"]
    assert dict(skipped) == {"no_config": "no config.json",
                             "no_eval_tags": "no eval/pass@1 scalars"}
    assert warnings == []
    by_name = {r.name: r for r in runs}
    assert by_name["b_nsr_s1"].model == "Tiny-1.5B"  # last path component, trailing slash ok
    assert by_name["a_wr_s1"].method == "W_REINFORCE (λ=0.1)"
    assert by_name["a_nsr_s2"].seed == 2


def test_duplicated_step_keeps_latest_wall_time(loaded) -> None:
    run = next(r for r in loaded[0] if r.name == "b_nsr_s1")
    assert run.scalars["eval/pass@1"] == pytest.approx({0: 0.50, 2: 0.55, 4: 0.60})


def test_aggregation_across_seeds_and_within_run(loaded) -> None:
    runs = loaded[0]
    models, methods, groups = results.group_runs(runs)
    assert models == ["Tiny-0.5B", "Tiny-1.5B"]
    assert methods == ["NSR", "PSR", "W_REINFORCE (λ=0.1)"]
    nsr = groups[("Tiny-0.5B", "NSR")]
    final = nsr.final()
    # two seeds 0.30, 0.40: mean 0.35, sample std 0.0707107, SE = std / sqrt(2) = 0.05
    assert (final.mean, final.se, final.n) == (pytest.approx(0.35), pytest.approx(0.05), 2)
    assert nsr.curve()[2].se == pytest.approx(0.01)  # 0.25, 0.27: std 0.01414 / sqrt(2)
    psr = groups[("Tiny-0.5B", "PSR")].final()  # one seed: the run's own SE
    assert (psr.mean, psr.se, psr.n) == (pytest.approx(0.33), pytest.approx(0.025), 1)
    # baseline pools step 0 of all four 0.5B runs: 0.20 0.22 0.20 0.18
    base = results.baseline([r for r in runs if r.model == "Tiny-0.5B"])
    assert base.mean == pytest.approx(0.20)
    assert base.se == pytest.approx(math.sqrt(0.0008 / 3) / 2)
    assert base.n == 4
    pk = results.pass_at_k(nsr.runs, lambda r: r.final_step)
    assert sorted(pk) == [1, 2, 4]
    assert pk[4].mean == pytest.approx(0.63) and pk[4].se == pytest.approx(0.03)


def test_smooth_is_trailing_moving_average() -> None:
    assert results.smooth([1.0, 3.0, 5.0, 9.0], 2) == [1.0, 2.0, 4.0, 7.0]
    assert results.smooth([1.0, 3.0, 5.0], 1) == [1.0, 3.0, 5.0]
    assert results.smooth([1.0, 3.0, 5.0], 3) == [1.0, 2.0, 3.0]


def test_fmt_precision() -> None:
    assert results.fmt(Stat(0.35, 0.05, 2)) == "35.0 ± 5.0"
    assert results.fmt(Stat(0.125, math.nan, 1)) == "12.5"
    assert results.fmt(None) == "–"


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| ")]


def test_results_md_holds_the_logged_numbers(loaded, logdir: Path) -> None:
    runs, skipped, _ = loaded
    md = results.results_markdown(runs, skipped, logdir)
    assert "## NSR: pass@1 (%) at each eval step" in md
    rows = table_rows(md)
    assert ["Model", "Seeds", "step 0", "step 2", "step 4"] in rows
    assert ["Tiny-0.5B", "2", "21.0 ± 1.0", "26.0 ± 1.0", "35.0 ± 5.0"] in rows
    assert ["Tiny-1.5B", "1", "50.0 ± 4.0", "55.0 ± 4.0", "60.0 ± 5.0"] in rows
    # W_REINFORCE logged no step-2 eval, so its table has no step-2 column
    i = md.index("## W_REINFORCE (λ=0.1): pass@1 (%) at each eval step")
    assert table_rows(md[i:])[:2] == [["Model", "Seeds", "step 0", "step 4"],
                                      ["Tiny-0.5B", "1", "18.0 ± 1.0", "31.0 ± 2.0"]]
    assert ["Model", "Method", "Runs", "Step", "pass@1 (%)", "pass@4 (%)"] in rows
    assert ["Tiny-0.5B", "Base (step 0)", "4 runs", "0", "20.0 ± 0.8", "41.0 ± 1.0"] in rows
    assert ["Tiny-0.5B", "NSR", "2 seeds", "4", "35.0 ± 5.0", "63.0 ± 3.0"] in rows
    assert ["Tiny-0.5B", "PSR", "1 seed", "4", "33.0 ± 2.5", "–"] in rows
    assert "- `no_eval_tags`: no eval/pass@1 scalars" in md
    assert "- `no_config`: no config.json" in md


def check_png(path: Path, min_px: int = 400) -> None:
    import matplotlib.image as mpimg

    assert path.stat().st_size > 10_000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_px, (path, img.shape)
    assert img[..., :3].std() > 0.05, path  # not a blank canvas


def test_cli_on_demo_logs_writes_valid_figures(tmp_path: Path) -> None:
    logdir, out = tmp_path / "runs", tmp_path / "vis"
    write_demo_logs(logdir, n_evals=5)
    res = subprocess.run([sys.executable, "plot_results.py", "--logdir", str(logdir), "--out",
                          str(out), "--note", "DEMO DATA"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(Path(p).name for p in res.stdout.split()) == sorted(OUTPUTS)
    for name in plotting.FIGURES:
        check_png(out / name)
    md = (out / "results.md").read_text()
    assert md.startswith("> DEMO DATA\n")  # --note marks results.md (and the figures)
    assert "| demo-model-L | GRPO | 2 seeds | 200 |" in md
    # models in size order, and no real model name on made-up numbers
    assert [md.index(f"| demo-model-{size} |") for size in "SML"] == sorted(
        md.index(f"| demo-model-{size} |") for size in "SML")
    assert "Qwen" not in md


def test_rerun_with_the_same_seed_is_warned_about(tmp_path: Path) -> None:
    for name in ["r1", "r1_rerun"]:
        write_run(tmp_path, name, {0: ev(0.1), 1: ev(0.2)}, cfg("m/M", "PSR", 7))
    runs, skipped, warnings = results.read_runs(tmp_path)
    assert len(runs) == 2 and not skipped
    assert [name for name, _ in warnings] == ["r1, r1_rerun"]
    md = results.results_markdown(runs, skipped, tmp_path, warnings)
    assert "## Warnings" in md and "same seed in several runs of M PSR" in md


@pytest.mark.parametrize("case", ["missing", "empty", "no_usable_run"])
def test_bad_logdir_is_one_line_error_and_no_outputs(tmp_path: Path, capsys, case: str) -> None:
    logdir, out = tmp_path / "runs", tmp_path / "vis"
    if case != "missing":
        logdir.mkdir()
    if case == "no_usable_run":
        write_run(logdir, "r", {0: {"train/loss": 1.0}}, cfg("m", "NSR", 1))
    assert plot_results.main(["--logdir", str(logdir), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(logdir) in err[0]
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_out_that_cannot_be_a_directory_is_one_line_error(tmp_path, capsys, logdir, where):
    (tmp_path / "vis").write_text("not a directory")
    out = tmp_path / "vis" if where == "file" else tmp_path / "vis" / "sub"
    assert plot_results.main(["--logdir", str(logdir), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(out) in err[0]
    assert (tmp_path / "vis").read_text() == "not a directory"


# ----------------------------------------------------------------------------- what a run kept


def write_resumed_run(logdir: Path, keep_metrics_file: bool) -> Path:
    """Logged through the training loop's own RunLogger: evals every 5 steps, the process killed
    right after the step-5 eval (its last checkpoint: step 4), then resumed from step 4 with
    --eval_every 3, so that step 5 is never evaluated again."""
    from rlvr.tracking import RunLogger

    run_dir = logdir / "resumed"
    dead = RunLogger(run_dir)
    dead.log(0, ev(0.10))
    for step in range(1, 6):
        dead.log(step, {"train/loss": 1.0})
    dead.log(5, ev(0.99))
    dead.close()  # every log() was flushed: a kill leaves the same files
    resumed = RunLogger(run_dir, resume_step=4)
    for step in range(5, 10):
        resumed.log(step, {"train/loss": 0.5})
        if step % 3 == 0:
            resumed.log(step, ev(0.20 + step / 100))
    resumed.close()
    (run_dir / "config.json").write_text(json.dumps(cfg("m/M", "NSR", 1)))
    if not keep_metrics_file:
        (run_dir / "metrics.jsonl").unlink()
    return run_dir


@pytest.mark.parametrize("source", ["metrics.jsonl", "events only"])
def test_evals_the_resumed_run_discarded_are_not_reported(tmp_path, source):
    write_resumed_run(tmp_path, keep_metrics_file=source == "metrics.jsonl")
    runs, skipped, warnings = results.read_runs(tmp_path)
    assert not skipped and not warnings
    assert runs[0].scalars["eval/pass@1"] == pytest.approx({0: 0.10, 6: 0.26, 9: 0.29})
    md = results.results_markdown(runs, skipped, tmp_path)
    assert ["Model", "Seeds", "step 0", "step 6", "step 9"] in table_rows(md)


def damage_event_file(run_dir: Path) -> str:
    [events] = run_dir.glob("events.out.tfevents.*")
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a record in the middle of the file
    events.write_bytes(bytes(data))
    return events.name


@pytest.mark.parametrize("keep_metrics_file", [True, False])
def test_a_damaged_event_file_is_reported_not_silently_cut_short(tmp_path, capsys,
                                                                 keep_metrics_file):
    evals = {step: ev(0.10 + step / 100) for step in range(0, 9, 2)}
    run_dir = write_run(tmp_path / "runs", "r", evals, cfg("m/M", "NSR", 1),
                        metrics_file=keep_metrics_file)
    name = damage_event_file(run_dir)
    assert plot_results.main(["--logdir", str(tmp_path / "runs"), "--out",
                              str(tmp_path / "vis")]) == 0
    err = capsys.readouterr().err
    assert f"warning: run 'r': event file {name} is unreadable after record" in err
    md = (tmp_path / "vis" / "results.md").read_text()
    assert f"event file {name} is unreadable" in md  # under "## Warnings"
    if keep_metrics_file:  # the numbers do not depend on the damaged file
        assert "| M | NSR | 1 seed | 8 |" in md
    else:  # they do, and the warning says what is lost
        assert "| M | NSR | 1 seed | 8 |" not in md and "missing here" in md


def test_an_unreadable_metrics_line_is_skipped_and_reported(tmp_path):
    run_dir = write_run(tmp_path, "r", {step: ev(0.1) for step in range(0, 9, 2)},
                        cfg("m/M", "NSR", 1))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:25]  # torn in the middle of the file
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    runs, _, warnings = results.read_runs(tmp_path)
    assert sorted(runs[0].scalars["eval/pass@1"]) == [0, 2, 6, 8]
    assert warnings == [("r", "metrics.jsonl: 1 unreadable line skipped (line 3)")]


@pytest.mark.slow
def test_plots_from_real_training_runs(tmp_path: Path, tiny_model_dir, tiny_data_dir) -> None:
    from tensorboard.backend.event_processing import event_accumulator as ea

    if not (REPO / "MATH_experiment.py").exists():
        pytest.skip("MATH_experiment.py not present")
    logdir, out = tmp_path / "runs", tmp_path / "vis"
    for obj in ["NSR", "PSR"]:
        cmd = [sys.executable, "MATH_experiment.py", "--backend", "hf", "--model_id",
               str(tiny_model_dir), "--objective", obj, "--n_train_steps", "2",
               "--rollout_batch_size", "4", "--rollouts_per_prompt", "2", "--max_tokens", "8",
               "--eval_every", "1", "--eval_n", "2", "--eval_limit", "4", "--data_dir",
               str(tiny_data_dir), "--output_dir", str(logdir), "--exp_name", f"tiny_{obj}"]
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, "plot_results.py", "--logdir", str(logdir), "--out",
                          str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in plotting.FIGURES:
        check_png(out / name)
    rows = table_rows((out / "results.md").read_text())
    model = Path(tiny_model_dir).name
    for obj in ["NSR", "PSR"]:
        # Read the logs independently of rlvr.plotting and look for the same printed numbers.
        acc = ea.EventAccumulator(str(logdir / f"tiny_{obj}"), size_guidance={ea.SCALARS: 0})
        acc.Reload()
        p1 = {e.step: e.value for e in acc.Scalars("eval/pass@1")}
        se = {e.step: e.value for e in acc.Scalars("eval/pass@1_se")}
        assert sorted(p1) == [0, 1, 2]
        cells = [results.fmt(Stat(p1[s], se[s], 1)) for s in sorted(p1)]
        assert [model, "1", *cells] in rows
        p2 = {e.step: e.value for e in acc.Scalars("eval/pass@2")}
        se2 = {e.step: e.value for e in acc.Scalars("eval/pass@2_se")}  # logged: shown
        assert [model, obj, "1 seed", "2", cells[-1], results.fmt(Stat(p2[2], se2[2], 1))] in rows


# ----------------------------------------------------------------------------- demo logs


def write_demo_logs(logdir: Path, n_evals: int = 9) -> None:
    """Plausible synthetic logs: 3 models x 4 objectives x 2 seeds, evals every 50 steps."""
    # Obviously fake names: real ones next to made-up numbers pass for results at a glance.
    models = {"demo-model-S": 0.30, "demo-model-M": 0.50, "demo-model-L": 0.74}
    gains = {"NSR": 0.05, "PSR": 0.045, "W_REINFORCE": 0.06, "GRPO": 0.055}
    rng = random.Random(0)
    for model, base in models.items():
        for obj, gain in gains.items():
            for seed in (1, 2):
                evals = {}
                for i in range(n_evals):
                    step, frac = 50 * i, i / (n_evals - 1)
                    p1 = base + gain * (1 - math.exp(-3 * frac)) + rng.gauss(0, 0.006)
                    # pass@k = 1 - (1 - pass@1) * k^-alpha; PSR narrows the gain at large k,
                    # NSR widens it (the paper's qualitative finding).
                    alpha = 0.35 + {"NSR": 0.04, "PSR": -0.08}.get(obj, 0.0) * frac
                    se = math.sqrt(p1 * (1 - p1) / 500)
                    evals[step] = {"eval/pass@1": p1, "eval/pass@1_se": se} | {
                        f"eval/pass@{k}": 1 - (1 - p1) * k**-alpha for k in (2, 4, 8, 16)}
                write_run(logdir, f"{model}_{obj}_s{seed}", evals,
                          cfg(f"demo/{model}", obj, seed) | {"n_train_steps": 50 * (n_evals - 1)})


if __name__ == "__main__":
    write_demo_logs(Path(sys.argv[1]))
