"""evaluate.py and its modules on CPU: eval sets, --limit, grading, outputs, resumption, errors."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO

from rlvr.eval_report import (
    SAMPLES,
    add_evals_to_report,
    read_jsonl,
    repair_samples,
)
from rlvr.eval_run import (
    EvalProblem,
    eval_examples,
    run_eval,
    training_eval_metrics,
)
from rlvr.eval_sets import load_eval_set, select_subset
from rlvr.evaluation import RECORD_KEYS, summarize_records
from rlvr.reward import BatchGrader
from rlvr.rollout import Completion

DATA_ROOT = REPO.parent / "shared/data"
SIZES = {"math": 5000, "math500": 500, "aime2024": 30, "aime2025": 30, "amc23": 40}
FOLDERS = {"math": "MATH", "math500": "MATH500", "aime2024": "AIME2024", "aime2025": "AIME2025",
           "amc23": "AMC23"}


@pytest.fixture(scope="session")
def data_root() -> Path:
    missing = [f for f in FOLDERS.values() if not (DATA_ROOT / f / "test.jsonl").is_file()]
    if missing:
        pytest.skip(f"evaluation sets not found under {DATA_ROOT}: {missing}")
    return DATA_ROOT


@pytest.fixture(scope="module")
def grader():
    with BatchGrader(num_workers=1, timeout_s=10.0) as g:
        yield g


def _env(tmp: Path) -> dict:
    # offline hub (fast failures), a private cache for exported checkpoints
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RLVR_CACHE": str(tmp / "cache"),
            "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env=env)


# ----------------------------------------------------------------------------- data


def test_eval_sets_load_with_counts_and_golds(data_root):
    sets = {name: load_eval_set(name, str(data_root)) for name in SIZES}
    assert {k: len(v) for k, v in sets.items()} == SIZES
    by_id = {k: {r["id"]: r for r in v} for k, v in sets.items()}
    assert by_id["math500"]["test/precalculus/807.json"]["answer"] == \
        r"\left( 3, \frac{\pi}{2} \right)"
    assert by_id["math"]["test/algebra/1.json"]["answer"] == "2"
    assert by_id["math"]["test/prealgebra/177.json"]["answer"] == "6"  # answer_overrides.json
    assert by_id["aime2024"]["aime2024/60"]["answer"] == "204"
    assert by_id["aime2024"]["aime2024/67"]["answer"] == "025"  # leading zero kept as given
    assert sets["aime2025"][0]["answer"] == "70" and sets["amc23"][0]["answer"] == "27"
    row = sets["math500"][0]
    assert row["subject"] == "Precalculus" and row["level"] == 2 and row["dataset"] == "math500"
    assert all(r["subject"] is None and r["level"] is None for r in sets["amc23"])
    assert all(r["problem"] and r["answer"] for v in sets.values() for r in v)


def test_hub_sources_read_the_documented_fields(monkeypatch):
    """Without --data_root the sets come from the hub ids in rlvr/eval_sets.py (a stand-in for
    `datasets.load_dataset` here: no network in tests)."""
    from types import SimpleNamespace

    from rlvr.data import DataError

    hub = {
        ("HuggingFaceH4/MATH-500", "test"): [
            {"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}", "answer": "1/2",
             "subject": "Algebra", "level": 3, "unique_id": "test/algebra/1.json"}],
        ("HuggingFaceH4/aime_2024", "train"): [
            {"id": 60, "problem": "q", "answer": "204", "solution": "...", "url": "u"}],
        ("TianHongZXY/amc23", "test"): [{"question": "r", "answer": 27.0}],
    }
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return hub[(name, split)]

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    [m] = load_eval_set("math500")
    assert (m["id"], m["answer"], m["subject"], m["level"]) == \
        ("test/algebra/1.json", "\\frac{1}{2}", "Algebra", 3)  # gold from the solution's box
    [a] = load_eval_set("aime2024")
    assert (a["id"], a["problem"], a["answer"]) == ("aime2024/60", "q", "204")
    [c] = load_eval_set("amc23")
    assert (c["id"], c["problem"], c["answer"]) == ("amc23/0", "r", "27")  # 27.0 read as 27
    assert calls == list(hub)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="needs the `datasets` package"):
        load_eval_set("aime2025")


def test_limit_is_stratified_and_seeded(data_root):
    rows = load_eval_set("math500", str(data_root))
    sub = select_subset(rows, 100, seed=0)
    assert len(sub) == 100 and sub == select_subset(rows, 100, seed=0)
    assert sub != select_subset(rows, 100, seed=1)
    assert [r["id"] for r in sub] == [r["id"] for r in rows if r in sub]  # source order
    full = Counter((r["subject"], r["level"]) for r in rows)
    got = Counter((r["subject"], r["level"]) for r in sub)
    assert all(abs(got[k] - n / 5) < 1 for k, n in full.items())  # every stratum within 1 row
    aime = load_eval_set("aime2025", str(data_root))
    picked = select_subset(aime, 7, seed=3)
    assert len({r["id"] for r in picked}) == 7 and picked == select_subset(aime, 7, seed=3)
    assert select_subset(aime, 50, seed=0) == aime


# ----------------------------------------------------------------------------- grading path


class ReplayEngine:
    """Hands back fixed responses, so that grading and summaries run on known answers."""

    name = "replay"

    def __init__(self, responses: dict[int, list[str]]):
        self.responses = responses  # first prompt token -> responses
        self.calls = 0

    def generate(self, prompts, n, temperature, max_tokens, return_logprobs=False, top_p=1.0,
                 seeds=None):
        self.calls += 1
        return [[Completion(list(range(len(t) % 7 + 1)), t, truncated=t.endswith("..."))
                 for t in self.responses[p[0]][:n]] for p in prompts]


def test_known_responses_through_grading_records_and_summary(grader):
    probs = [EvalProblem("aime/1", "aime2024", "?", "025", [0]),
             EvalProblem("aime/2", "aime2024", "?", "\\frac{1}{2}", [1]),
             EvalProblem("math/3", "math500", "?", "(3,-1)", [2], "Algebra", 2)]
    engine = ReplayEngine({
        0: ["so \\boxed{25}", "\\boxed{025}", "no box at all...", "\\boxed{26}"],
        1: ["\\boxed{0.5}", "\\boxed{\\dfrac12}", "\\boxed{1/2}", "\\boxed{2}"],
        2: ["\\boxed{(3, -1)}", "\\boxed{(-1,3)}", "\\boxed{3}", "cut off..."],
    })
    chunks = []
    res = run_eval(engine, grader, probs, n=4, temperature=0.6, top_p=0.95, max_tokens=8,
                   seed=0, model="m", chunk_samples=4, on_chunk=chunks.append, progress=None)
    assert engine.calls == 3 and [len(c) for c in chunks] == [4, 4, 4]  # one problem per chunk
    assert res.scores == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]  # 25 == 025
    assert [r["problem_id"] for r in res.records] == ["aime/1"] * 4 + ["aime/2"] * 4 + \
        ["math/3"] * 4
    first = res.records[0]
    assert set(first) == set(RECORD_KEYS)
    assert first["extracted"] == "25" and first["gold"] == "025" and first["score"] == 1.0
    assert res.records[2]["extracted"] is None and res.records[2]["finish_reason"] == "length"
    m = training_eval_metrics(res)
    assert m["pass@1"] == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    # pass@2 per problem: 1 - C(2,2)/C(4,2) = 5/6, 1 - 0 = 1, 1 - C(3,2)/C(4,2) = 1/2
    assert m["pass@2"] == pytest.approx((5 / 6 + 1 + 0.5) / 3)
    assert m["pass@4"] == 1.0 and m["pass@4_se"] == 0.0
    assert m["no_box_frac"] == pytest.approx(2 / 12)
    assert m["truncated_frac"] == pytest.approx(2 / 12)
    assert m["pass@1/algebra"] == 0.25 and m["pass@1/level_2"] == 0.25
    assert "pass@1/level_unknown" not in m  # AIME rows have no level
    assert m["grade_timeouts"] == 0 and m["n_problems"] == 3 and m["n_samples_per_problem"] == 4
    assert eval_examples(res, 1) == ["**aime/1** (gold `025`, score 1)\n\nso \\boxed{25}"]


def test_hf_engine_in_loop_metrics(tiny_model_dir, grader, data_root):
    """The training loop's eval (real HF engine, tiny model) yields today's keys and the new."""
    import torch

    from rlvr.engines import HFEngine
    from rlvr.eval_run import problems_from_rows
    from rlvr.modeling import eos_token_ids, load_policy, load_tokenizer
    from rlvr.prompts import encode_problems

    tok = load_tokenizer(str(tiny_model_dir))
    policy = load_policy(str(tiny_model_dir), torch.device("cpu"), False)
    engine = HFEngine(policy, tok, eos_token_ids(policy, tok))
    rows = select_subset(load_eval_set("math500", str(data_root)), 2, seed=0)
    enc = encode_problems(rows, tok, "paper")
    problems = problems_from_rows(enc.rows, enc.prompt_ids)
    assert [(p.id, p.dataset) for p in problems] == [(r["id"], "math500") for r in rows]
    res = run_eval(engine, grader, problems, n=2, temperature=1.0, top_p=1.0, max_tokens=3,
                   seed=0, progress=None)
    m = training_eval_metrics(res)
    for key in ("pass@1", "pass@1_se", "pass@2", "pass@2_se", "n_problems",
                "n_samples_per_problem", "grade_timeouts", "no_box_frac", "response_len",
                "truncated_frac"):
        assert key in m, key
    assert any(k.startswith("pass@1/level_") for k in m)
    assert m["n_problems"] == 2 and all(len(r["response"]) >= 0 for r in res.records)
    assert all(r["response_tokens"] <= 3 for r in res.records)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A MATH_experiment.py-style run directory with one checkpoint of a perturbed tiny model,
    written by the training loop's own checkpoint writer."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlvr.checkpoint import save_checkpoint

    run = tmp_path_factory.mktemp("runs") / "tiny_NSR_s1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model_id": str(tiny_model_dir)}))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_checkpoint(run, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    return run


def _args(tiny_model_dir, run_dir, data_root, out) -> list[str]:
    return ["--model_id", str(tiny_model_dir), str(run_dir / "checkpoints" / "step_1"),
            "--datasets", "math500", "amc23", "--data_root", str(data_root), "--limit", "2",
            "--n", "2", "--max_tokens", "4", "--backend", "hf", "--grader_workers", "1",
            "--out", str(out)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, run_dir, data_root):
    """One evaluation of two models (a model directory and a run's checkpoint) on two sets, run
    in this process (a subprocess would spend most of its time importing torch again)."""
    tmp = tmp_path_factory.mktemp("evals")
    args = _args(tiny_model_dir, run_dir, data_root, tmp / "out")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setenv("RLVR_CACHE", str(tmp / "cache"))
        rc = _evaluate_module().main(args)
    assert rc == 0, stdout.getvalue()[-3000:]
    return tmp, args, stdout.getvalue()


def test_cli_writes_every_output_and_summary_recomputes(finished, tiny_model_dir):
    tmp, _, stdout = finished
    out = tmp / "out"
    records, torn = read_jsonl(out / SAMPLES)
    assert not torn and len(records) == 2 * (2 + 2) * 2  # models x problems x samples
    assert all(list(r) == list(RECORD_KEYS) for r in records)
    tiny = tiny_model_dir.name  # a model directory is named by its folder
    assert {r["model"] for r in records} == {tiny, "tiny_NSR_s1/step_1"}
    assert all(r["finish_reason"] in ("stop", "length") and r["response_tokens"] <= 4
               for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"] == json.loads(json.dumps(summarize_records(records)))
    r = summary["results"][tiny]["math500"]
    assert r["n_problems"] == 2 and r["n_samples"] == 4 and "pass@2_se" in r
    assert any(k.startswith("pass@1/level_") for k in r)
    assert not any(k.startswith("pass@1/") for k in summary["results"][tiny]["amc23"])
    assert summary["status"][tiny]["amc23"] == {"problems_done": 2, "problems_total": 2}
    assert summary["protocol"]["n"] == 2 and summary["protocol"]["top_p"] == 0.95
    md = (out / "results.md").read_text()
    assert "## math500" in md and "## amc23" in md and "pass@1 by level" in md
    assert "| tiny_NSR_s1/step_1 |" in md and (out / "pass_at_k_curves.png").stat().st_size
    timing, _ = read_jsonl(out / "timing.jsonl")
    assert len(timing) == 4 and all(t["engine"] == "hf" for t in timing)
    assert "pass@1" in stdout and "tiny_NSR_s1/step_1" in stdout and "[eval] " in stdout
    assert list((tmp / "cache" / "checkpoints").iterdir())  # the exported checkpoint


def test_finished_rerun_is_a_noop(finished):
    """The script itself, re-run on a finished evaluation: prints the summary, touches nothing
    and loads no model (so it is quick: no torch import either)."""
    tmp, args, _ = finished
    out = tmp / "out"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    proc = run_cli(*args, env=_env(tmp))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "every requested problem is done" in proc.stdout and "pass@1" in proc.stdout
    assert "engine" not in proc.stdout
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_resume_after_an_interrupted_write(finished, capsys, monkeypatch):
    tmp, args, _ = finished
    monkeypatch.setenv("RLVR_CACHE", str(tmp / "cache"))  # the checkpoint exported before
    out = tmp / "resumed"
    shutil.copytree(tmp / "out", out)
    lines = (out / SAMPLES).read_text().splitlines(keepends=True)
    # A kill mid-chunk: the last problem lost entirely, the one before lost a sample, and a line
    # half written.
    (out / SAMPLES).write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    (out / "summary.json").unlink()
    assert _evaluate_module().main([*args[:-1], str(out)]) == 0
    assert "[resume] dropped 2 lines" in capsys.readouterr().out
    records, torn = read_jsonl(out / SAMPLES)
    keys = [(r["model"], r["dataset"], r["problem_id"], r["sample"]) for r in records]
    assert not torn and len(keys) == len(set(keys)) == len(lines)
    kept = "".join(lines[:-4])  # the finished problems' lines are untouched
    assert (out / SAMPLES).read_text().startswith(kept)
    timing, _ = read_jsonl(out / "timing.jsonl")
    assert timing[-1]["problems"] == 2 and len(timing) == 5  # only the two cut problems redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"] == json.loads(json.dumps(summarize_records(records)))


def test_resume_after_a_kill_equals_the_uninterrupted_evaluation(tmp_path, tiny_model_dir,
                                                                  data_root, capsys):
    """SIGKILL the script once its first chunk is on disk, then re-run: the finished problems
    are kept as they are, the rest are done once, and samples.jsonl is byte for byte the one an
    uninterrupted evaluation with the same --seed writes (each problem's samples depend only on
    the seed, its dataset and its id)."""
    import signal
    import time

    def args(out: Path) -> list[str]:
        return ["--model_id", str(tiny_model_dir), "--datasets", "amc23", "--data_root",
                str(data_root), "--limit", "6", "--n", "2", "--max_tokens", "4", "--backend",
                "hf", "--grader_workers", "1", "--chunk_samples", "2", "--seed", "3",
                "--out", str(out)]

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *args(out)], cwd=REPO,
                            env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((out / SAMPLES).is_file() and (out / SAMPLES).stat().st_size) \
            and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the script and its grading worker
    proc.wait()
    before, _ = read_jsonl(out / SAMPLES)
    assert before, "the script died before writing its first chunk"
    assert _evaluate_module().main(args(out)) == 0
    records, torn = read_jsonl(out / SAMPLES)
    keys = [(r["problem_id"], r["sample"]) for r in records]
    assert not torn and len(keys) == len(set(keys)) == 6 * 2
    done_before = {r["problem_id"] for r in before}
    assert records[:len(before)] == before  # kept, not redone
    timing, _ = read_jsonl(out / "timing.jsonl")
    assert timing[-1]["problems"] == 6 - len(done_before) < 6
    assert _evaluate_module().main(args(tmp_path / "straight")) == 0
    assert (out / SAMPLES).read_bytes() == (tmp_path / "straight" / SAMPLES).read_bytes()
    capsys.readouterr()


def test_repair_keeps_whole_problems_only(tmp_path):
    def rec(pid, j):
        return {"model": "m", "dataset": "d", "problem_id": pid, "sample": j}

    path = tmp_path / SAMPLES
    good = [rec("a", 0), rec("a", 1), rec("b", 0), rec("b", 1), rec("b", 1), rec("c", 0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"model": "m", "da')
    kept, dropped = repair_samples(path, n=2)
    assert [(r["problem_id"], r["sample"]) for r in kept] == [("a", 0), ("a", 1)]
    assert dropped == 5 and read_jsonl(path) == (kept, False)


def test_eval_report_for_plot_results(finished, tmp_path):
    tmp, _, _ = finished
    (tmp_path / "results.md").write_text("# Results\n\ntraining tables\n")
    written = add_evals_to_report([tmp / "out"], tmp_path, note="random-weight tiny model")
    assert {p.name for p in written} == {"eval_pass_at_k.png", "results.md"}
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# Results") and "# Evaluations (evaluate.py)" in md
    assert "### math500" in md and "eval_pass_at_k.png" in md


def test_every_table_and_figure_says_how_big_each_eval_was(finished):
    """pass@1 0.0 from 2 problems x 2 samples must not read like certainty: the tables and each
    panel of the figure state problems x samples, and a line of zeros stays above the axis."""
    from rlvr.eval_report import (
        build_summary,
        format_summary_table,
        pass_at_k_figure,
        results_markdown,
    )

    tmp, _, _ = finished
    out = tmp / "out"
    summary = build_summary(out, json.loads((out / "eval_config.json").read_text()))
    md = results_markdown(summary)
    assert "| model | problems × samples | pass@1 |" in md and "| 2 × 2 |" in md
    assert "problems × samples" in format_summary_table(summary)
    fig = pass_at_k_figure([("out", summary)])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["math500: 2 problems × 2 samples", "amc23: 2 problems × 2 samples"]
    assert all(ax.get_ylim()[0] < 0 for ax in fig.axes)


def test_the_timing_line_claims_no_grading_rate_when_nothing_was_graded():
    from rlvr.eval_report import format_summary_table

    line = {"samples": 48, "wall_s": 60.0, "gen_tokens_per_s": 100.0, "grade_wait_s": 0.0,
            "grade_timeouts": 0, "grade_s": 0.0003}
    text = format_summary_table({"results": {}, "timing": {"m": {"d": {
        **line, "graded": 0, "graded_samples_per_s": None}}}})
    assert "nothing graded (no sample has a \\boxed{} answer)" in text
    assert "samples/s" not in text


def test_grading_rate_counts_only_the_samples_math_verify_graded(tmp_path):
    from rlvr.eval_report import TIMING, _timing

    seg = {"model": "m", "dataset": "d", "problems": 6, "samples": 12, "tokens": 48,
           "gen_s": 2.0, "grade_s": 0.5, "grade_wait_s": 0.0, "wall_s": 3.0,
           "grade_timeouts": 0}
    (tmp_path / TIMING).write_text(json.dumps({**seg, "graded": 0}) + "\n"
                                   + json.dumps({**seg, "graded": 4}) + "\n")
    t = _timing(tmp_path)["m"]["d"]
    assert (t["graded"], t["samples"], t["graded_samples_per_s"]) == (4, 24, 4 / 1.0)


# ----------------------------------------------------------------------------- bad inputs


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BAD = {
    "unknown dataset": (["--datasets", "math600"], "unknown dataset 'math600'"),
    "n": (["--n", "0"], "--n must be >= 1"),
    "temperature": (["--temperature", "-0.1"], "--temperature must be >= 0"),
    "top_p 0": (["--top_p", "0"], "--top_p must be in (0, 1]"),
    "top_p > 1": (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    "max_tokens": (["--max_tokens", "0"], "--max_tokens must be >= 1"),
    "limit": (["--limit", "0"], "--limit must be >= 1"),
    "greedy n": (["--temperature", "0"], "--temperature 0 is greedy, one sample per problem, "
                 "but --n is 256; pass --n 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_flags_are_one_line_errors(case, tmp_path, tiny_model_dir, capsys):
    flags, message = BAD[case]
    out = tmp_path / "out"
    rc = _evaluate_module().main(["--model_id", str(tiny_model_dir), "--out", str(out),
                                  "--data_root", str(DATA_ROOT), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_bad_models_data_and_out_dirs_are_one_line_errors(tmp_path, tiny_model_dir, run_dir,
                                                           finished, capsys):
    ev = _evaluate_module()
    tmp, args, _ = finished
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "x.txt").write_text("x")
    (tmp_path / "empty_root").mkdir()
    (tmp_path / "f").write_text("a file where --out wants a directory")
    base = ["--data_root", str(DATA_ROOT), "--datasets", "amc23"]
    cases = [
        (["--model_id", "./no/such/model", *base], "not found"),
        (["--model_id", str(tmp_path / "not_a_model"), *base], "neither a model directory"),
        (["--model_id", str(run_dir), *base], "has no final_model/"),
        (["--model_id", str(run_dir), "--checkpoint", "step_9", *base],
         "no checkpoints/step_9 (available: step_1)"),
        (["--model_id", str(tiny_model_dir), "--checkpoint", "step_1", *base],
         "--checkpoint applies to run directories"),
        (["--model_id", str(tiny_model_dir), "--data_root", str(tmp_path / "empty_root")],
         "MATH/test.jsonl not found; --data_root must hold MATH/test.jsonl"),
        (["--model_id", str(tiny_model_dir), *base, "--out", str(tmp_path / "f" / "out")],
         f"cannot write the output directory {tmp_path / 'f' / 'out'}: {tmp_path / 'f'} is a "
         "file, not a directory; pass another --out"),
        (["--model_id", str(tiny_model_dir), "--data_root", str(tmp_path / "nowhere")],
         "is not a directory"),
        ([*args[:-1], str(tmp_path / "not_a_model")], "not an evaluate.py output directory"),
    ]
    for argv, message in cases:
        out = tmp_path / "fresh_out"
        rc = ev.main([*argv, "--out", str(out)] if "--out" not in argv else argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    # the finished evaluation's --out with another protocol: refused, left as it was
    before = (tmp / "out" / SAMPLES).read_bytes()
    rc = ev.main([*args[:args.index("--n")], "--n", "3", *args[args.index("--n") + 2:]])
    err = capsys.readouterr().err
    assert rc == 2 and "another configuration: --n 2 -> 3" in err
    assert (tmp / "out" / SAMPLES).read_bytes() == before


def test_bad_hub_id_is_a_one_line_error(tmp_path, data_root, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries
    out = tmp_path / "out"
    rc = _evaluate_module().main(["--model_id", "no-such-org/no-such-model-xyz", "--datasets",
                                  "amc23", "--data_root", str(data_root), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and len(err.strip().splitlines()) == 1
    assert err.startswith("error: cannot load --model_id no-such-org/no-such-model-xyz")
