"""Regenerate the figures and results.md from the training logs and evaluate.py outputs.

    python plot_results.py --logdir runs --out visualizations
    python plot_results.py --evals evals/base evals/nsr --out visualizations   # pass@k curves
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlvr.eval_report import ReportError, add_evals_to_report
from rlvr.plotting import PlotError, make_all


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", type=Path, default=Path("runs"),
                   help="directory with one subdirectory per run (<logdir>/<exp_name>/)")
    p.add_argument("--out", type=Path, default=Path("visualizations"),
                   help="where the PNGs and results.md are written")
    p.add_argument("--smooth", type=int, default=2,
                   help="trailing moving-average window over eval points (1 = no smoothing)")
    p.add_argument("--dpi", type=int, default=150, help="resolution of the PNGs")
    p.add_argument("--evals", type=Path, nargs="+", default=[], metavar="DIR",
                   help="evaluate.py output directories: pass@k curves (eval_pass_at_k.png) and "
                        "their tables added to results.md; without runs under --logdir, only these")
    p.add_argument("--note", default="", help="footer text on every figure and atop results.md "
                                              "(e.g. 'synthetic demo data')")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error("--smooth must be >= 1")
    try:
        written = ([] if args.evals and not args.logdir.is_dir()
                   else make_all(args.logdir, args.out, args.smooth, args.dpi, args.note))
        if args.evals:
            written += add_evals_to_report(args.evals, args.out, args.note, args.dpi)
    except (PlotError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
