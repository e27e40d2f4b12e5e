"""Evaluation sets as uniform problem rows: MATH-500, MATH (full test), AIME 2024/2025, AMC 2023.

Every loader returns rows {"id", "dataset", "problem", "answer", "subject", "level"}. Gold answers
of the MATH sets are the last `\\boxed{}` of the solution with rlvr/answer_overrides.json applied
(the same `prepare_split` as the training data); AIME and AMC golds are the `answer` field as
given (math-verify grades `25` and `025` alike). Subject and level are None outside MATH.

Sources: `--data_root DIR` with DIR/<folder>/test.jsonl (the layout of ../shared/data, see
EVAL_SETS.md there), or the hub through the optional `datasets` package.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from rlvr.data import (
    DataError,
    load_math,
    load_overrides,
    prepare_split,
    read_json_lines,
    stratified_subset,
)


@dataclass(frozen=True)
class EvalSet:
    name: str
    folder: str  # under --data_root
    hub_id: str
    hub_split: str
    has_solution: bool  # MATH rows: gold from the solution's last box
    size: int  # rows of the full set


EVAL_SETS = {
    s.name: s for s in (
        EvalSet("math500", "MATH500", "HuggingFaceH4/MATH-500", "test", True, 500),
        # the full 5,000-problem test split, seven subject configs (rlvr.data.HUB_DATASET)
        EvalSet("math", "MATH", "EleutherAI/hendrycks_math", "test", True, 5000),
        EvalSet("aime2024", "AIME2024", "HuggingFaceH4/aime_2024", "train", False, 30),
        # the paper's own copies (its eval.sh: --datasets TianHongZXY/AIME2025,TianHongZXY/amc23)
        EvalSet("aime2025", "AIME2025", "TianHongZXY/AIME2025", "test", False, 30),
        EvalSet("amc23", "AMC23", "TianHongZXY/amc23", "test", False, 40),
    )
}


def _hub_rows(spec: EvalSet) -> list[dict]:
    try:
        import datasets  # heavy and optional: only the hub source needs it
    except ImportError:
        raise DataError(f"loading {spec.name} from the hub needs the `datasets` package: "
                        "pip install datasets, or pass --data_root DIR") from None
    try:
        ds = datasets.load_dataset(spec.hub_id, split=spec.hub_split)
    except Exception as e:  # network, auth, a renamed split: all end the run the same way
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {spec.hub_id} [{spec.hub_split}] for {spec.name}: "
                        f"{msg}") from None
    return [dict(r) for r in ds]


def _read_jsonl(path: Path) -> list[dict]:
    rows = read_json_lines(path)
    if not rows:
        raise DataError(f"{path}: no rows; --data_root must hold the set's problems there")
    return rows


def _answer_text(value) -> str:
    # Some hub copies store AMC answers as floats (27.0): grade them as the integers they are.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _answer_rows(spec: EvalSet, raw: list[dict], where: str) -> list[dict]:
    rows = []
    for i, r in enumerate(raw):
        problem = r.get("problem", r.get("question"))  # the paper's eval.py reads either
        if not isinstance(problem, str) or r.get("answer") in (None, ""):
            raise DataError(f"{where}: row {i} needs 'problem' (or 'question') and 'answer'; fix "
                            "that row")
        rid = r.get("unique_id") or (f"{spec.name}/{r['id']}" if "id" in r else f"{spec.name}/{i}")
        rows.append({"id": str(rid), "dataset": spec.name, "problem": problem,
                     "answer": _answer_text(r["answer"]), "subject": None, "level": None})
    return rows


def _math_rows(spec: EvalSet, data_root: str | None) -> list[dict]:
    if data_root is None and spec.name == "math":
        raw = load_math(None, "test")  # EleutherAI/hendrycks_math, as data_prep.py reads it
    elif data_root is None:
        from rlvr.data import _normalise  # the hub MATH-500 rows are MATH rows (subject, int level)

        raw = [_normalise(r, f"{spec.hub_id}[{i}]") for i, r in enumerate(_hub_rows(spec))]
    else:
        raw = load_math(str(Path(data_root) / spec.folder), "test")
    kept, _dropped, _multi, _applied = prepare_split(raw, load_overrides(), "test")
    out = []
    for i, r in enumerate(kept):
        out.append({"id": r.get("unique_id") or f"test:{i}", "dataset": spec.name,
                    "problem": r["problem"], "answer": r["answer"], "subject": r["subject"],
                    "level": r["level"]})
    return out


def load_eval_set(name: str, data_root: str | None = None) -> list[dict]:
    """The rows of one evaluation set, in source order; DataError (one line) on any problem."""
    if name not in EVAL_SETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(EVAL_SETS)}")
    spec = EVAL_SETS[name]
    if data_root is not None:
        path = Path(data_root) / spec.folder / "test.jsonl"
        if not path.is_file():
            raise DataError(f"{name}: {path} not found; --data_root must hold "
                            f"{spec.folder}/test.jsonl (or leave {name} out of --datasets)")
    if spec.has_solution:
        rows = _math_rows(spec, data_root)
    elif data_root is None:
        rows = _answer_rows(spec, _hub_rows(spec), spec.hub_id)
    else:
        path = Path(data_root) / spec.folder / "test.jsonl"
        rows = _answer_rows(spec, _read_jsonl(path), str(path))
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"{name}: duplicate problem ids in the source; fix the source (each "
                        "problem once)")
    return rows


def select_subset(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """`limit` rows, in source order: stratified by subject x level where rows have a subject
    (the MATH sets, via rlvr.data.stratified_subset), else a plain seeded sample."""
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if all(r["subject"] is not None for r in rows):
        return stratified_subset(rows, limit / len(rows), seed)
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]
