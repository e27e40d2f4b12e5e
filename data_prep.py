"""Build the stratified MATH subset that training and evaluation read.

    python data_prep.py                               # hub: EleutherAI/hendrycks_math
    python data_prep.py --source ../shared/data/MATH  # local train.jsonl / test.jsonl
    python data_prep.py --source MATH                 # release layout MATH/train/<subject>/<n>.json

Writes <output_dir>/{train,test}.jsonl and manifest.json. Nothing is written until every split has
been loaded and checked; files are written under temporary names and renamed at the very end, so a
failed run leaves the output directory as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from rlvr.data import (
    HUB_DATASET,
    SPLITS,
    DataError,
    load_math,
    load_overrides,
    output_row,
    prepare_split,
    split_seed,
    stratified_subset,
    stratum_counts,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--source",
        default=None,
        help="local MATH directory (<split>.jsonl or <split>/<subject>/<n>.json); None reads "
        f"the hub dataset {HUB_DATASET} (needs `datasets`)",
    )
    p.add_argument("--output_dir", default="data/math_subset",
                   help="where <split>.jsonl and manifest.json are written")
    p.add_argument("--fraction", type=float, default=0.25,
                   help="share of each split to keep, stratified by subject x level, in (0, 1]")
    p.add_argument("--seed", type=int, default=42,
                   help="same seed, byte-identical output; each split draws from its own stream")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="which splits to build")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build(args: argparse.Namespace) -> tuple[dict[str, bytes], dict]:
    """All outputs in memory: {file name: bytes} and the manifest (without checksums yet)."""
    if not 0 < args.fraction <= 1:
        raise DataError(f"--fraction must be in (0, 1], got {args.fraction}")
    overrides = load_overrides()
    manifest: dict = {
        "source": args.source or f"hub:{HUB_DATASET}",
        "seed": args.seed,
        "fraction": args.fraction,
        "splits": list(args.splits),
        "counts": {},
        "dropped_no_answer": {},
        "overrides_applied": {},
        "multi_box": {},
    }
    files = {}
    for split in dict.fromkeys(args.splits):  # a repeated split would only be done twice
        rows = load_math(args.source, split)
        kept, dropped, multi_box, applied = prepare_split(rows, overrides, split)
        subset = stratified_subset(kept, args.fraction, split_seed(args.seed, split))
        manifest["counts"][split] = {
            "before": stratum_counts(rows),
            "eligible": stratum_counts(kept),
            "after": stratum_counts(subset),
            "total": {"before": len(rows), "eligible": len(kept), "after": len(subset)},
        }
        manifest["dropped_no_answer"][split] = dropped
        manifest["overrides_applied"][split] = applied
        manifest["multi_box"][split] = multi_box
        lines = (json.dumps(output_row(r), ensure_ascii=False) + "\n" for r in subset)
        files[f"{split}.jsonl"] = "".join(lines).encode("utf-8")
    manifest["sha256"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return files, manifest


def write_atomically(output_dir: Path, files: dict[str, bytes]) -> None:
    """Write every file under a temporary name, then rename them all; clean up on failure."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = {name: output_dir / f".{name}.tmp-{os.getpid()}" for name in files}
    try:
        for name, data in files.items():
            tmp[name].write_bytes(data)
        for name in files:
            os.replace(tmp[name], output_dir / name)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def report(manifest: dict) -> str:
    """Counts per subject and per level, before -> after, for each split."""
    out = []
    for split, counts in manifest["counts"].items():
        t = counts["total"]
        dropped = len(manifest["dropped_no_answer"][split])
        out.append(
            f"{split}: {t['before']} rows, {dropped} dropped (no answer), {t['after']} selected"
        )
        by_level: dict[str, list[int]] = {}
        for subject, levels in counts["before"].items():
            after = counts["after"].get(subject, {})
            out.append(f"  {subject:<24} {sum(levels.values()):>5} -> {sum(after.values()):>5}")
            for level, n in levels.items():
                pair = by_level.setdefault(level, [0, 0])
                pair[0] += n
                pair[1] += after.get(level, 0)
        for level, (before, after) in sorted(by_level.items()):
            out.append(f"  {'Level ' + level:<24} {before:>5} -> {after:>5}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files, manifest = build(args)
        manifest_bytes = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
        write_atomically(Path(args.output_dir), {**files, "manifest.json": manifest_bytes})
    except (DataError, OSError, UnicodeDecodeError) as e:
        # OSError/UnicodeDecodeError: unreadable input or unwritable output, still one line.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(manifest))
    n_multi = sum(len(v) for v in manifest["multi_box"].values())
    n_fixed = sum(len(v) for v in manifest["overrides_applied"].values())
    print(
        f"{n_multi} solutions box several different values, {n_fixed} gold answers overridden "
        f"(see manifest.json); wrote {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
