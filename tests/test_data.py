"""Data preparation: loading, gold answers, stratification, and the data_prep.py CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import data_prep
from rlvr.data import (
    DataError,
    all_boxed,
    load_math,
    load_overrides,
    load_subset,
    parse_level,
    prepare_split,
    split_seed,
    stratified_subset,
)

REPO = Path(__file__).resolve().parents[1]

# Hand-checked against the solution text: nested braces, escaped braces, `\boxed 5`, several
# boxes (the last one counts), a box inside Asymptote code, and two overrides.
REFERENCE_ANSWERS = {
    "train/algebra/654.json": r"\frac{\sqrt{3}}{12}",
    "train/algebra/2385.json": r"\frac{\sqrt[3]{4}}{6}",
    "train/algebra/1397.json": "17",
    "train/algebra/24014.json": "2",  # `$\boxed 2$`
    "train/geometry/6188.json": r"\{4,5,7\}",
    "test/intermediate_algebra/1301.json": r"\{-1\} \cup [0,7)",
    "test/intermediate_algebra/2015.json": r"\{1\pm\sqrt{5},-2\}",
    "train/precalculus/865.json": r"\begin{pmatrix} -2/3 \\ 2/3 \\ 1/3 \end{pmatrix}",
    "train/number_theory/837.json": r"8\!:\!34 \text{ p.m.}",
    "test/algebra/1197.json": "161",  # boxes an intermediate form first, then a+b+c+d
    "train/counting_and_probability/955.json": "22",  # first box is inside [asy] code
    "test/prealgebra/177.json": "6",  # override: last box is the notation's 12
    "test/algebra/1878.json": "-2, 1",  # override: "all solutions", boxed one at a time
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "data_prep.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# Full data through the CLI (one subprocess run per configuration, shared by the tests)


@pytest.fixture(scope="module")
def full_runs(math_dir, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, seed in (("a", "42"), ("b", "42")):
        out[name] = tmp_path_factory.mktemp(f"subset_{name}")
        proc = run_cli("--source", str(math_dir), "--output_dir", str(out[name]), "--seed", seed)
        assert proc.returncode == 0, proc.stderr
        out[f"{name}_stdout"] = proc.stdout
    return out


@pytest.fixture(scope="module")
def manifest(full_runs) -> dict:
    return json.loads((full_runs["a"] / "manifest.json").read_text())


def test_full_counts(full_runs, manifest):
    assert len(read_jsonl(full_runs["a"] / "train.jsonl")) == 1875
    assert len(read_jsonl(full_runs["a"] / "test.jsonl")) == 1250
    assert manifest["counts"]["train"]["total"] == {"before": 7500, "eligible": 7498, "after": 1875}
    assert manifest["counts"]["test"]["total"] == {"before": 5000, "eligible": 5000, "after": 1250}


def test_every_stratum_within_one_row(manifest):
    for split in ("train", "test"):
        eligible, after = manifest["counts"][split]["eligible"], manifest["counts"][split]["after"]
        for subject, levels in eligible.items():
            for level, n in levels.items():
                got = after.get(subject, {}).get(level, 0)
                assert abs(got - 0.25 * n) <= 1, (split, subject, level, n, got)


def test_output_rows(full_runs):
    rows = read_jsonl(full_runs["a"] / "test.jsonl")
    assert list(rows[0]) == ["problem", "solution", "answer", "subject", "level", "unique_id"]
    assert all(r["answer"] and isinstance(r["level"], int) for r in rows)
    train = read_jsonl(full_runs["a"] / "train.jsonl")
    assert {r["level"] for r in train} <= {1, 2, 3, 4, 5, None}
    # Output order is the source order, so unique_ids of one subject come out ascending.
    algebra = [int(r["unique_id"].split("/")[-1][:-5]) for r in rows if r["subject"] == "Algebra"]
    assert algebra == sorted(algebra)


def test_no_problem_in_both_outputs(full_runs):
    def problems(split: str) -> set[str]:
        # Whitespace-insensitive: the source has one train/test pair that differs only by a
        # trailing newline (train/geometry/6032, test/precalculus/24307).
        return {" ".join(r["problem"].split()) for r in read_jsonl(full_runs["a"] / split)}

    assert not problems("train.jsonl") & problems("test.jsonl")


def test_determinism(full_runs, manifest):
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert sha256(full_runs["a"] / name) == sha256(full_runs["b"] / name)
    assert manifest["sha256"]["train.jsonl"] == sha256(full_runs["a"] / "train.jsonl")
    assert manifest["sha256"]["test.jsonl"] == sha256(full_runs["a"] / "test.jsonl")


def test_seed_sensitivity(math_dir, full_runs, tmp_path, capsys):
    assert (
        data_prep.main(["--source", str(math_dir), "--output_dir", str(tmp_path), "--seed", "7"])
        == 0
    )
    for name in ("train.jsonl", "test.jsonl"):
        assert sha256(tmp_path / name) != sha256(full_runs["a"] / name)


def test_manifest_hygiene(manifest):
    assert manifest["source"].endswith("MATH") and manifest["seed"] == 42
    assert manifest["dropped_no_answer"] == {
        "train": ["train/number_theory/7115.json", "train/number_theory/7117.json"],
        "test": [],
    }
    assert sum(len(v) for v in manifest["multi_box"].values()) == 48
    fixed = {a["id"]: a for a in manifest["overrides_applied"]["test"]}
    assert fixed["test/prealgebra/177.json"]["extracted"] == "12"
    assert fixed["test/prealgebra/177.json"]["answer"] == "6"


def test_report_printed(full_runs):
    out = full_runs["a_stdout"]
    assert "train: 7500 rows, 2 dropped (no answer), 1875 selected" in out
    assert "Counting & Probability" in out and "Level 5" in out and "->" in out


def test_reference_answers(math_dir):
    answers = {}
    for split in ("train", "test"):
        kept, *_ = prepare_split(load_math(str(math_dir), split), load_overrides(), split)
        answers.update({r["unique_id"]: r["answer"] for r in kept})
    for uid, expected in REFERENCE_ANSWERS.items():
        assert answers[uid] == expected, uid


# ---------------------------------------------------------------------------------------------
# Units on small synthetic data


def make_rows(sizes: dict[tuple[str, int | None], int]) -> list[dict]:
    return [
        {"problem": f"{s} {lv} {i}", "solution": rf"\boxed{{{i}}}", "subject": s, "level": lv}
        for (s, lv), n in sizes.items()
        for i in range(n)
    ]


def test_largest_remainder():
    # Remainders 0.75, 0.5, 0.25, 0.0 of sizes 3, 2, 1, 4 -> total floor(2.5 + .5) = 3.
    rows = make_rows({("A", 1): 3, ("A", 2): 2, ("B", 1): 1, ("B", None): 4})
    got = Counter((r["subject"], r["level"]) for r in stratified_subset(rows, 0.25, 0))
    assert got == {("A", 1): 1, ("A", 2): 1, ("B", None): 1}


def test_ties_broken_by_seed():
    rows = make_rows({(s, 1): 2 for s in "ABCDEFGH"})  # 8 strata, remainder .5 each, 4 extra
    picks = {frozenset(r["subject"] for r in stratified_subset(rows, 0.25, s)) for s in range(20)}
    assert all(len(p) == 4 for p in picks) and len(picks) > 1


def test_subset_order_fraction_one_and_seed():
    rows = make_rows({("A", 1): 50, ("B", 2): 30})
    assert stratified_subset(rows, 1.0, 3) == rows
    sub = stratified_subset(rows, 0.3, 3)
    assert len(sub) == 24 and sub == [r for r in rows if r in sub]  # original order
    assert sub == stratified_subset(rows, 0.3, 3)
    assert sub != stratified_subset(rows, 0.3, 4)
    with pytest.raises(DataError):
        stratified_subset(rows, 0.0, 3)


def test_split_seed_independent():
    assert split_seed(42, "train") != split_seed(42, "test")
    assert split_seed(42, "train") == split_seed(42, "train") != split_seed(43, "train")


def test_all_boxed_and_levels():
    text = r"$\boxed{\frac{\sqrt{3}}{2}}$, $\boxed{\{1\}}$, \fbox{x} $\boxed 5$ \boxed{} \boxed{"
    assert all_boxed(text) == [r"\frac{\sqrt{3}}{2}", r"\{1\}", "x", "5"]
    # one token without braces, as LaTeX and extract_boxed read it
    assert all_boxed(r"$\boxed 5x$ and $\boxed \pi r$") == ["5", r"\pi"]
    assert [parse_level(v) for v in ("Level 3", "Level ?", 4, None)] == [3, None, 4, None]


def test_prepare_split_drops_and_overrides():
    rows = [
        {"problem": "p0", "solution": r"\boxed{1} then \boxed{2}", "subject": "A", "level": 1},
        {"problem": "p1", "solution": r"\boxed{}", "subject": "A", "level": 1},
        {"problem": "p2", "solution": "no box", "subject": "A", "level": 1, "unique_id": "u2"},
    ]
    sha = hashlib.sha256(b"p0").hexdigest()
    overrides = {"x/1.json": {"answer": "3", "reason": "r", "problem_sha256": sha}}
    kept, dropped, multi, applied = prepare_split(rows, overrides, "test")
    assert [r["answer"] for r in kept] == ["3"]  # matched by problem hash: rows have no id
    assert dropped == ["test:1", "u2"]
    assert multi == [{"id": "test:0", "boxes": ["1", "2"], "answer": "2"}]
    assert applied[0]["extracted"] == "2"


def test_release_layout(tmp_path):
    for split, subject, n, level in (
        ("train", "algebra", 10, "Level 2"),
        ("train", "algebra", 2, "Level 1"),
        ("train", "geometry", 1, "Level ?"),
        ("test", "algebra", 5, "Level 5"),
    ):
        path = tmp_path / "MATH" / split / subject / f"{n}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "problem": f"P{n}",
                    "level": level,
                    "type": subject.title(),
                    "solution": rf"so $\boxed{{{n}}}$",
                }
            )
        )
    rows = load_math(str(tmp_path / "MATH"), "train")
    assert [r["unique_id"] for r in rows] == [
        "train/algebra/2.json",
        "train/algebra/10.json",
        "train/geometry/1.json",
    ]
    assert [r["level"] for r in rows] == [1, 2, None]
    assert rows[0]["subject"] == "Algebra" and "type" not in rows[0]
    out = tmp_path / "out"
    assert (
        data_prep.main(
            ["--source", str(tmp_path / "MATH"), "--output_dir", str(out), "--fraction", "1.0"]
        )
        == 0
    )
    assert [r["answer"] for r in read_jsonl(out / "test.jsonl")] == ["5"]
    assert len(load_subset(str(out), "train")) == 3


def test_jsonl_extra_keys_kept(tmp_path):
    row = {
        "problem": "p",
        "level": "Level 3",
        "type": "Algebra",
        "solution": r"\boxed{1}",
        "source_note": "x",
    }
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n\n")
    [got] = load_math(str(tmp_path), "train")
    assert got == {
        "problem": "p",
        "solution": r"\boxed{1}",
        "subject": "Algebra",
        "level": 3,
        "source_note": "x",
    }


def test_load_subset_names_the_fix_for_a_missing_a_file_or_an_empty_split(tmp_path):
    with pytest.raises(DataError, match=r"build it with `python data_prep.py --output_dir "):
        load_subset(str(tmp_path), "train")
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"holds no problems; rebuild it .* larger --fraction"):
        load_subset(str(tmp_path), "train")
    with pytest.raises(DataError, match=r"is a file; pass the directory data_prep.py wrote"):
        load_subset(str(tmp_path / "train.jsonl"), "train")


def test_a_fraction_that_keeps_nothing_is_refused_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    row = {"problem": "p", "level": "Level 1", "type": "Algebra", "solution": r"\boxed{1}"}
    for split in ("train", "test"):
        (source / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "out"
    assert data_prep.main(["--source", str(source), "--output_dir", str(out),
                           "--fraction", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --fraction 0.1 keeps none of the 1 train problems; pass "
                          "--fraction 0.5 or more") and err.count("\n") == 1
    assert not out.exists()


def _hub_stand_in(math_dir: Path, fail: bool = False):
    """`datasets` serving the shared MATH jsonl as the hub's seven subject configs (no network
    in tests), or failing as it does offline."""
    from types import SimpleNamespace

    by_subject: dict[str, dict[str, list[dict]]] = {}
    for split in ("train", "test"):
        for line in (math_dir / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            row.pop("unique_id", None)  # hub rows carry none
            by_subject.setdefault(split, {}).setdefault(row["type"], []).append(row)

    def load_dataset(name, config, split):
        if fail:
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
        subject = config.replace("_and_", " & ").replace("_", " ").title()
        return by_subject[split][subject]

    return SimpleNamespace(load_dataset=load_dataset)


def test_a_first_run_builds_the_default_subset_as_data_prep_does(math_dir, tmp_path,
                                                                 monkeypatch, capsys):
    from rlvr.config import Config
    from rlvr.run_setup import load_data

    monkeypatch.setitem(sys.modules, "datasets", _hub_stand_in(math_dir))
    monkeypatch.chdir(tmp_path)
    train, test = load_data(Config())  # --data_dir data/math_subset, not there yet
    assert (len(train), len(test)) == (1875, 1250)
    assert "building it from the hub" in capsys.readouterr().out
    assert data_prep.main(["--output_dir", "by_data_prep"]) == 0  # the same hub, by hand
    for name in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "data/math_subset" / name).read_bytes() == \
            (tmp_path / "by_data_prep" / name).read_bytes(), name


def test_a_first_run_that_fails_to_write_the_subset_leaves_no_directory(math_dir, tmp_path,
                                                                        monkeypatch):
    """A directory at --data_dir counts as built: a half-written one would never be built again
    (and a run of a study starting meanwhile would take it)."""
    from rlvr.subset import build_default_subset

    monkeypatch.setitem(sys.modules, "datasets", _hub_stand_in(math_dir))
    monkeypatch.chdir(tmp_path)
    real = Path.write_bytes

    def full_disk(path, data):
        if path.name == "test.jsonl":  # the second file
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(DataError, match="No space left on device"):
        build_default_subset("data/math_subset")
    assert not (tmp_path / "data/math_subset").exists()
    assert list((tmp_path / "data").iterdir()) == []  # nor its temporary sibling
    monkeypatch.setattr(Path, "write_bytes", real)
    assert build_default_subset("data/math_subset")  # the next run builds it
    assert (tmp_path / "data/math_subset/manifest.json").is_file()


def test_offline_a_first_run_names_the_command_that_builds_the_subset(math_dir, tmp_path,
                                                                      monkeypatch, capsys):
    from rlvr.config import Config
    from rlvr.run_setup import load_data

    monkeypatch.setitem(sys.modules, "datasets", _hub_stand_in(math_dir, fail=True))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        load_data(Config())
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: no MATH subset at data/math_subset, and it cannot be built "
                          "from the hub (cannot load EleutherAI/hendrycks_math/algebra [train]")
    assert err.rstrip().endswith("`python data_prep.py --source /path/to/MATH`")
    assert not (tmp_path / "data").exists()
    with pytest.raises(SystemExit):  # a --data_dir of the user's own is never built
        load_data(Config(data_dir="mine"))
    assert "build it with `python data_prep.py --output_dir mine`" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one-line error, exit 2, and nothing written


def bad_sources(root: Path) -> dict[str, tuple[Path, str]]:
    good = json.dumps(
        {"problem": "p", "level": "Level 1", "type": "Algebra", "solution": r"\boxed{1}"}
    )
    cases = {
        "missing": (root / "nope", "source not found"),
        "empty": (root / "empty", "no train data in"),
    }
    (root / "empty").mkdir()
    for name, second_line in (
        ("malformed", '{"problem": "p",'),
        ("no_solution", json.dumps({"problem": "p", "type": "Algebra"})),
    ):
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text(good + "\n" + second_line + "\n")
        (root / name / "test.jsonl").write_text(good + "\n")
    cases["malformed"] = (root / "malformed", "train.jsonl:2: malformed JSON")
    cases["no_solution"] = (root / "no_solution", "train.jsonl:2: row missing 'solution'")
    return cases


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "no_solution"])
def test_bad_input(case, tmp_path, capsys):
    source, message = bad_sources(tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    assert data_prep.main(["--source", str(source), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_help_explains_every_flag_with_its_default():
    parser = data_prep.build_parser()
    flags = [a for a in parser._actions if a.dest != "help"]
    assert [a.dest for a in flags if not a.help] == []
    text = " ".join(parser.format_help().split())
    for default in ["None", "data/math_subset", "0.25", "42", "['train', 'test']"]:
        assert f"(default: {default})" in text


def test_bad_input_exit_code(tmp_path):
    proc = run_cli("--source", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: source not found")
    assert not (tmp_path / "out").exists()
