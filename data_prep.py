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
import sys
from pathlib import Path

from rlvr.cli import EXIT_REFUSED, ArgumentParser
from rlvr.data import HUB_DATASET, SPLITS, DataError
from rlvr.subset import (
    DEFAULT_FRACTION,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEED,
    build,
    manifest_bytes,
    write_atomically,
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="data_prep.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--source",
        default=None,
        help="local MATH directory (<split>.jsonl or <split>/<subject>/<n>.json); None reads "
        f"the hub dataset {HUB_DATASET} (needs `datasets`)",
    )
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                   help="where <split>.jsonl and manifest.json are written")
    p.add_argument("--fraction", type=float, default=DEFAULT_FRACTION,
                   help="share of each split to keep, stratified by subject x level, in (0, 1]")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="same seed, byte-identical output; each split draws from its own stream")
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS),
                   help="which splits to build")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
        files, manifest = build(args.source, args.fraction, args.seed, args.splits)
    except (DataError, OSError, UnicodeDecodeError) as e:
        # OSError/UnicodeDecodeError: an unreadable input, still one line
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        write_atomically(Path(args.output_dir),
                         {**files, "manifest.json": manifest_bytes(manifest)})
    except OSError as e:
        print(f"error: cannot write --output_dir {args.output_dir}: {e.strerror or e}; choose "
              "another --output_dir", file=sys.stderr)
        return EXIT_REFUSED
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
