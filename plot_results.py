"""Regenerate the figures and results.md from the training logs and evaluate.py outputs.

    python plot_results.py                                  # runs/ -> results/
    python plot_results.py --evals evals/base evals/nsr     # pass@k curves of evaluate.py outputs
    python plot_results.py --study studies/seed             # a run_study.py study's report

The README's own figures in visualizations/ are regenerated only on purpose, with an explicit
--out visualizations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlvr.cli import EXIT_REFUSED
from rlvr.eval_report import ReportError, add_evals_to_report
from rlvr.plotting import PlotError, make_all, make_study_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", type=Path, default=Path("runs"),
                   help="directory with one subdirectory per run (<logdir>/<exp_name>/)")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="where the PNGs and results.md are written")
    p.add_argument("--study", type=Path, default=None, metavar="DIR",
                   help="a run_study.py study directory: writes DIR/results.md (intervals, "
                        "paired differences) and its figures into DIR; --logdir and --out "
                        "are not used")
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
        if args.study is not None:
            if not (args.study / "runs").is_dir():
                raise PlotError(f"--study {args.study} is not a study directory (no runs/)")
            written = make_study_report(args.study, args.smooth, args.dpi, args.note)
        else:
            written = ([] if args.evals and not args.logdir.is_dir()
                       else make_all(args.logdir, args.out, args.smooth, args.dpi, args.note))
            if args.evals:
                written += add_evals_to_report(args.evals, args.out, args.note, args.dpi)
    except (PlotError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
