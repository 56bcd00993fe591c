"""Compare trainer runs: one markdown table row per run and a PNG of their curves.

    python tools/compare_runs.py output/dset4_r18_synth_cpu output/dset4_r18_synth_cpu_balanced \\
        --out-png output/compare.png --out-md output/compare.md

Row: AP, AP_small/medium/large and the DSET bias metrics (keep-recall per size bucket and far/near, centroid
dy) of the run's last evaluation (eval/<highest epoch>.json), and the last epoch's train loss_cass from
log.jsonl ('-' where the run has none). The PNG has one column per run: AP, loss_cass and keep-recall
large / near against the epoch (from log.jsonl).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from src.misc.run_summary import RunDirError, format_summary_table, read_log, run_curves, summarize_run

PANELS = (("AP", "AP"), ("loss_cass", "train loss_cass"), ("keep_recall", "keep-recall (eval)"))


def plot_runs(run_dirs: Sequence[str], names: Sequence[str], path: str) -> None:
    """Write a PNG with one column per run and one row per panel (AP, loss_cass, keep-recall large/near)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), len(run_dirs), figsize=(4.0 * len(run_dirs), 2.6 * len(PANELS)),
                             squeeze=False, sharex="col")
    for col, (run_dir, name) in enumerate(zip(run_dirs, names)):
        curves = run_curves(read_log(run_dir))
        series_of = {"AP": ["AP"], "loss_cass": ["loss_cass"],
                     "keep_recall": ["keep_recall_large", "keep_recall_near"]}
        for row, (panel, title) in enumerate(PANELS):
            ax = axes[row][col]
            drawn = False
            for series in series_of[panel]:
                data = curves[series]
                if data["epoch"]:
                    ax.plot(data["epoch"], data["value"], marker="o", markersize=3, label=series)
                    drawn = True
            if not drawn:
                ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
            elif panel == "keep_recall":
                ax.legend(fontsize=7)
            ax.set_title(f"{name}: {title}" if row == 0 else title, fontsize=9)
            ax.grid(alpha=0.3)
            if row == len(PANELS) - 1:
                ax.set_xlabel("epoch")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(run_dirs: Sequence[str], out_png: Optional[str] = None, out_md: Optional[str] = None) -> str:
    """The markdown table of the runs (also written to out_md) and, with out_png, the curves PNG.

    Run names are the directory names; RunDirError names the run directory and the missing file.
    """
    rows = [summarize_run(d) for d in run_dirs]
    table = format_summary_table(rows)
    if out_md:
        os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
        with open(out_md, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if out_png:
        plot_runs(run_dirs, [r["name"] for r in rows], out_png)
    return table


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trainer output directories")
    p.add_argument("--out-png", default=None, help="write the curves here (PNG)")
    p.add_argument("--out-md", default=None, help="also write the table here (markdown)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        print(compare(args.run_dirs, args.out_png, args.out_md))
    except RunDirError as err:
        print(f"compare_runs: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
