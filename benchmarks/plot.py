"""Plot a lab_fio.py result: one PNG with IOPS (4k jobs) and MB/s (1M jobs) per backstore.

    python3 benchmarks/plot.py lab-out/bench/fio.json [-o docs/img/fio.png]

Runs on the host (the guest has no matplotlib): ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("fileio", "tcmu-runner", "plain", "targetmirror", "tm-calls", "tm-drain",
         "targetmirror-python", "ab-default", "ab-drain")
COLOURS = {"fileio": "#888888", "tcmu-runner": "#4477aa", "plain": "#66aa55",
           "targetmirror": "#cc6677", "tm-calls": "#aa4499", "tm-drain": "#882255",
           "targetmirror-python": "#ddaa33", "ab-default": "#ee8866", "ab-drain": "#663333"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=None,
                    help="PNG to write (default: next to the JSON)")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.json.read_text())
    mean: dict[str, dict[str, dict[str, float]]] = data["mean"]
    small = [j for j in mean if j.startswith("4k")]
    large = [j for j in mean if not j.startswith("4k")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8),
                             gridspec_kw={"width_ratios": [max(len(small), 1),
                                                           max(len(large), 1)]})
    for ax, jobs, key, label in ((axes[0], small, "iops", "IOPS"),
                                 (axes[1], large, "mbps", "MB/s")):
        names = [n for n in ORDER if any(n in mean[j] for j in mean)]
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            vals = [mean[j].get(name, {}).get(key, 0.0) for j in jobs]
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(jobs))]
            ax.bar(xs, vals, width, label=name, color=COLOURS[name])
        ax.set_xticks(range(len(jobs)))
        ax.set_xticklabels(jobs, rotation=15, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"fio over iSCSI in the QEMU lab, {data.get('date', '')} "
                 f"(targetmirror workers={data.get('workers')}, {data.get('seconds')} s/job)",
                 fontsize=10)
    fig.tight_layout()
    out = args.out or args.json.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
