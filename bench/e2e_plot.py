"""Plot end-to-end results: tokens/s and peak-minus-static GiB per system, grouped by configuration.

    python bench/e2e_plot.py RESULTS.jsonl [--out PNG]   (default: the results file's name, .png)

Reads the records ``bench/e2e.py`` writes (the last record of a case wins, as in the report); a
failed system is left out of its group and named under the axis (e.g. "unsloth: OOM"). Padded and
packed runs are groups of their own (real tokens/s); --max-context searches, one length a system
rather than a speed, are left to the report's table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import e2e_label, occupied_gib

SYSTEMS = ("hf", "liger", "unsloth", "fusetune", "fusetune (no offload)", "fusetune (graph)")
PANELS = (("tokens_per_s", "tokens/s"), ("added_gib", "peak - static GiB"))


def table(records: list[dict]) -> dict:
    """{case label: {system label: {"tokens_per_s", "added_gib", "error"}}} from the records."""
    metrics: dict = {}
    for row in records:
        config = row["config"]
        if config.get("mode") == "max_context":
            continue
        size = f"{config['tokens'] // 1024}k" if "tokens" in config else config["mode"]
        case = f"{config['model']} {size}\n{config['variant']}"
        system = e2e_label(row)
        metrics.setdefault(case, {}).setdefault(system, {})[row["metric"]] = row
    out: dict = {}
    for case, systems in metrics.items():
        for system, rows in systems.items():
            static = rows.get("static_gib", {}).get("value")
            peak = occupied_gib(rows.get("peak_allocated_gib", {}))
            speed = rows.get("tokens_per_s", {})
            error = speed.get("error", "")
            out.setdefault(case, {})[system] = {
                "tokens_per_s": speed.get("value"),
                "added_gib": None if static is None or peak is None else peak - static,
                "error": "OOM" if "out of memory" in error.lower() else error.split(":")[0],
            }
    return out


def plot(records: list[dict], path: Path) -> Path:
    """Two bar panels (tokens/s, peak - static GiB), one bar group per configuration; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = table(records)
    cases = list(data)
    systems = [s for s in SYSTEMS if any(s in data[c] for c in cases)]
    width = 0.8 / max(len(systems), 1)
    # Panels one above the other: with a dozen configurations side by side they would be too wide to read.
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(2 + 1.5 * len(cases), 4.5 * len(PANELS)))
    for axis, (metric, title) in zip(axes, PANELS, strict=True):
        for i, system in enumerate(systems):
            for j, case in enumerate(cases):
                value = data[case].get(system, {}).get(metric)
                if value is not None:
                    bar = axis.bar(j + (i - (len(systems) - 1) / 2) * width, value, width,
                                   color=f"C{SYSTEMS.index(system)}", label=system)
                    axis.bar_label(bar, fmt="{:,.0f}" if metric == "tokens_per_s" else "{:.1f}", fontsize=7)
        labels = [case + "".join(f"\n{system}: {v['error']}" for system, v in data[case].items()
                                 if v[metric] is None and v["error"]) for case in cases]
        axis.set_xticks(range(len(cases)), labels, fontsize=8)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    handles = {label: handle for axis in axes
               for handle, label in zip(*axis.get_legend_handles_labels(), strict=True)}
    figure.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    records = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print(f"wrote {plot(records, args.out or args.results.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
