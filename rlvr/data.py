"""MATH data: load either source, extract gold answers, and draw the stratified subset.

Everything here is a pure function of its inputs, so `data_prep.py` is only argument parsing, I/O
and printing. Randomness comes from `random.Random` seeded per split (see `split_seed`), never from
global state, so the same seed gives byte-identical output on any machine.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

# Listing every box must use exactly the rule `extract_boxed` uses for the last one, or "several
# different values" would mean something else: both come from the one parser in rlvr.reward.
from rlvr.reward import box_arguments, extract_boxed

HUB_DATASET = "EleutherAI/hendrycks_math"
HUB_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
SPLITS = ("train", "test")
OVERRIDES_PATH = Path(__file__).with_name("answer_overrides.json")

# Keys that the normalised row owns; the source's `type` becomes `subject`, the rest are kept.
_RENAMED = {"type", "level"}


class DataError(ValueError):
    """Bad input data or a missing file; the message is one line meant for the user."""


# ---------------------------------------------------------------------------------------------
# Loading


def parse_level(level: Any) -> int | None:
    """'Level 3' -> 3, 3 -> 3; 'Level ?' (two train problems) or anything else -> None."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    match = re.fullmatch(r"\s*Level\s+(\d+)\s*", str(level)) if level is not None else None
    return int(match.group(1)) if match else None


def _normalise(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("problem", "solution"):
        if not isinstance(raw.get(key), str):
            raise DataError(f"{where}: row missing '{key}'")
    subject = raw.get("type", raw.get("subject"))
    if not isinstance(subject, str):
        raise DataError(f"{where}: row missing 'type' (the subject)")
    row = {
        "problem": raw["problem"],
        "solution": raw["solution"],
        "subject": subject,
        "level": parse_level(raw.get("level")),
    }
    # Extra keys (unique_id and anything else the source carries) travel with the row.
    row.update({k: v for k, v in raw.items() if k not in row and k not in _RENAMED})
    return row


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg}); fix or remove that "
                                "line") from None
            rows.append(_normalise(raw, where))
    if not rows:
        raise DataError(f"{path}: no rows; pass --source a directory whose {path.name} holds "
                        "the problems")
    return rows


def _read_release(split_dir: Path, split: str) -> list[dict]:
    """Original release layout: <split>/<subject_dir>/<n>.json, one problem per file."""
    files = [p for p in split_dir.glob("*/*.json") if p.is_file()]
    if not files:
        raise DataError(f"{split_dir}: no <subject>/<n>.json files; pass --source the MATH "
                        "release directory (it holds train/ and test/)")
    # Numeric order within a subject directory so 2.json precedes 10.json.
    files.sort(key=lambda p: (p.parent.name, int(p.stem) if p.stem.isdigit() else -1, p.stem))
    rows = []
    for path in files:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg}, line {e.lineno}); fix or remove "
                            "that file") from None
        row = _normalise(raw, str(path))
        row.setdefault("unique_id", f"{split}/{path.parent.name}/{path.name}")
        rows.append(row)
    return rows


def _load_hub(split: str) -> list[dict]:
    try:
        import datasets  # heavy and optional: only the hub source needs it
    except ImportError:
        raise DataError(
            "the hub source needs the `datasets` package: pip install datasets, "
            "or pass --source <local MATH directory>"
        ) from None
    rows = []
    for config in HUB_CONFIGS:
        try:
            ds = datasets.load_dataset(HUB_DATASET, config, split=split)
        except Exception as e:  # network, auth, missing config: all end the run the same way
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"cannot load {HUB_DATASET}/{config} [{split}]: {msg}; connect to "
                            "the hub, or pass --source a local copy of MATH") from None
        rows.extend(_normalise(raw, f"{HUB_DATASET}/{config}[{split}]") for raw in ds)
    return rows


def load_math(source: str | None, split: str) -> list[dict]:
    """Rows of one MATH split with keys problem, solution, subject, level (int | None) + extras.

    `source` None reads the hub dataset (all seven subject configs, in the order of HUB_CONFIGS).
    A directory is read as `<source>/<split>.jsonl` (hub row format) if that file exists, else
    as the release layout `<source>/<split>/<subject>/<n>.json`, whose rows get
    unique_id "<split>/<subject>/<n>.json". Answers are not extracted here.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if source is None:
        return _load_hub(split)
    root = Path(source)
    if not root.exists():
        raise DataError(f"source not found: {source}; pass --source an existing MATH directory "
                        "(or leave it out to read the hub)")
    if not root.is_dir():
        raise DataError(f"source must be a directory: {source}; pass the directory that holds "
                        "train.jsonl and test.jsonl (or train/ and test/)")
    if (root / f"{split}.jsonl").is_file():
        return _read_jsonl(root / f"{split}.jsonl")
    if (root / split).is_dir():
        return _read_release(root / split, split)
    raise DataError(
        f"no {split} data in {source}: expected {split}.jsonl or {split}/<subject>/<n>.json; "
        "pass --source the directory that holds them"
    )


def load_subset(data_dir: str, split: str) -> list[dict]:
    """Rows written by data_prep.py (with `answer`), for the training and evaluation scripts;
    DataError naming the fix when the directory is not one data_prep.py wrote, or the split is
    empty."""
    root, path = Path(data_dir), Path(data_dir) / f"{split}.jsonl"
    if root.is_file():
        raise DataError(f"--data_dir {data_dir} is a file; pass the directory data_prep.py "
                        "wrote (it holds train.jsonl and test.jsonl)")
    if not path.is_file():
        raise DataError(f"no MATH subset at {path}; build it with `python data_prep.py "
                        f"--output_dir {data_dir}`, or pass --data_dir the directory "
                        "data_prep.py wrote")
    rows = read_json_lines(path)
    if not rows:
        raise DataError(f"{path} holds no problems; rebuild it with `python data_prep.py "
                        f"--output_dir {data_dir}` and a larger --fraction")
    return rows


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file (blank lines skipped); a bad line is a DataError naming
    the file and line."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix that line, or "
                                    "rebuild the file") from None
    return rows


# ---------------------------------------------------------------------------------------------
# Gold answers


def all_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed`/`\\fbox` in order, parsed by the same rule as extract_boxed.

    Unclosed and empty boxes are skipped. Nested boxes are listed too (outer first).
    """
    return [arg for arg in box_arguments(text) if arg]


def problem_sha256(problem: str) -> str:
    return hashlib.sha256(problem.encode("utf-8")).hexdigest()


def load_overrides(path: str | Path = OVERRIDES_PATH) -> dict[str, dict]:
    """unique_id -> {"answer", "reason", "problem_sha256"} from the repo's overrides file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}  # "_comment" keys


def row_id(row: dict, index: int, split: str) -> str:
    """unique_id when the source has one (files), else the row's position (hub)."""
    return row.get("unique_id") or f"{split}:{index}"


def _find_override(row: dict, overrides: dict[str, dict], by_hash: dict[str, str]) -> str | None:
    # Hub rows carry no unique_id, so fall back to the problem text's hash.
    if row.get("unique_id") in overrides:
        return row["unique_id"]
    if "unique_id" not in row:
        return by_hash.get(problem_sha256(row["problem"]))
    return None


def prepare_split(
    rows: list[dict], overrides: dict[str, dict], split: str
) -> tuple[list[dict], list[str], list[dict], list[dict]]:
    """Attach `answer` to each row; drop rows without one.

    Returns (kept rows with `answer`, ids of dropped rows, multi-box records, overrides applied).
    Overrides are applied before the drop check, so an override can rescue a box-less solution.
    An empty box (`\\boxed{}`) counts as no answer.
    """
    by_hash = {v["problem_sha256"]: k for k, v in overrides.items() if "problem_sha256" in v}
    kept, dropped, multi_box, applied = [], [], [], []
    for index, row in enumerate(rows):
        rid = row_id(row, index, split)
        answer = extract_boxed(row["solution"])
        boxes = list(dict.fromkeys(all_boxed(row["solution"])))  # distinct, first-seen order
        if len(boxes) > 1:
            multi_box.append({"id": rid, "boxes": boxes, "answer": answer})
        key = _find_override(row, overrides, by_hash)
        if key is not None:
            fix = overrides[key]
            applied.append(
                {
                    "id": rid,
                    "override": key,
                    "extracted": answer,
                    "answer": fix["answer"],
                    "reason": fix["reason"],
                }
            )
            answer = fix["answer"]
        if not answer:
            dropped.append(rid)
            continue
        kept.append({**row, "answer": answer})
    return kept, dropped, multi_box, applied


# ---------------------------------------------------------------------------------------------
# Stratification


def split_seed(seed: int, split: str) -> int:
    """Independent seed per split, so train and test never share one RNG stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:8], "big")


def _stratum(row: dict) -> tuple[str, int]:
    # None (the "Level ?" rows) sorts before every real level and forms its own stratum.
    return row["subject"], -1 if row["level"] is None else row["level"]


def stratified_subset(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    """A `fraction` of `rows`, stratified by subject x level, in the rows' original order.

    The total is floor(fraction * N + 1/2); each stratum gets floor(fraction * size) and the
    leftover rows go to the strata with the largest remainders, ties broken by the seeded RNG.
    So every stratum is within one row of fraction * size. Arithmetic is exact (fraction is read
    as the decimal it prints as), so 0.1 does not become 0.1000000000000000055.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    frac = Fraction(str(fraction))
    strata: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        strata[_stratum(row)].append(i)
    keys = sorted(strata)  # fixed order so the RNG draws are reproducible
    rng = random.Random(seed)

    quota = {k: int(frac * len(strata[k])) for k in keys}
    remainder = {k: frac * len(strata[k]) - quota[k] for k in keys}
    total = int(frac * len(rows) + Fraction(1, 2))
    tiebreak = {k: rng.random() for k in keys}
    by_remainder = sorted(keys, key=lambda k: (-remainder[k], tiebreak[k]))
    for k in by_remainder[: total - sum(quota.values())]:
        quota[k] += 1

    chosen = []
    for k in keys:
        chosen.extend(rng.sample(strata[k], quota[k]))
    return [rows[i] for i in sorted(chosen)]


def stratum_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{subject: {level: n}} with levels as strings ("?" for None), both sorted, for JSON."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        counts[row["subject"]]["?" if row["level"] is None else str(row["level"])] += 1

    def level_key(level: str) -> tuple[int, str]:
        return (0, f"{int(level):09d}") if level.isdigit() else (1, level)

    return {
        s: {lv: counts[s][lv] for lv in sorted(counts[s], key=level_key)} for s in sorted(counts)
    }


def output_row(row: dict) -> dict:
    """The published row: fixed key order first, then whatever extra keys the source had."""
    out = {k: row[k] for k in ("problem", "solution", "answer", "subject", "level")}
    if "unique_id" in row:
        out["unique_id"] = row["unique_id"]
    out.update({k: row[k] for k in sorted(row) if k not in out})
    return out
