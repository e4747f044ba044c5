"""Render benchmark results (JSON lines) as Markdown tables in bench/RESULTS.md.

    python bench/report.py [--results DIR] [--out FILE]

One section per ops or end-to-end results file (``DIR/ops-*.jsonl``, ``DIR/e2e-*.jsonl``; the
tuning sweeps stay raw data), between ``<!-- begin NAME -->`` and
``<!-- end NAME -->`` markers: re-running replaces a file's section and leaves the rest of the
document (hand-written notes, other sections) alone.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
SYSTEM_ORDER = ("fusetune", "torch_eager", "torch_compile", "liger", "matmul")
E2E_ORDER = ("hf", "liger", "unsloth", "fusetune")
RIVALS = ("liger", "torch_compile")  # fusetune's speed ratio is taken against the faster of these
TITLE = "# Benchmark results\n"
# A context projection stops short of the whole memory by these GiB. Device: the CUDA context
# (~0.5 GiB, outside the allocator's peak) and the allocator's slack (reserved above allocated,
# fragmentation at the largest lengths). Host: the OS and the other processes.
DEVICE_RESERVE_GIB = 2.0
HOST_RESERVE_GIB = 8.0


def load(path: Path) -> list[dict]:
    """The records of one JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def header(records: list[dict]) -> str:
    """GPU, library versions and date of a run, from its records."""
    first = records[0]
    liger = next((r["liger"] for r in records if r.get("liger")), None)
    liger = f" · Liger-Kernel {liger}" if liger else ""
    return (f"GPU: {first['gpu']} · torch {first['torch']} · triton {first['triton']} · "
            f"transformers {first['transformers']}{liger} · {first['date']}")


def failure_kind(error: str) -> str:
    """OOM, timeout or the exception's name: a failure in one word."""
    if "out of memory" in error.lower() or "OutOfMemory" in error:
        return "OOM"
    return "timeout" if error.startswith("timeout") else error.split(":")[0]


def cell(systems: dict, system: str, metric: str, spec: str) -> str:
    """A formatted value; OOM or err for a failed measurement; blank when not measured."""
    row = systems.get(system, {}).get(metric)
    if row is None:
        return ""
    if row["value"] is not None:
        return format(row["value"], spec)
    return "OOM" if failure_kind(row.get("error", "")) == "OOM" else "err"


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def ops_table(cases: dict) -> list[str]:
    """op, shape, variant, ms and peak MiB per system, fusetune's roofline fraction and speed ratio."""
    timed = {key: systems for key, systems in cases.items()
             if any(common.TIME in metrics for metrics in systems.values())}
    if not timed:
        return []
    present = [s for s in SYSTEM_ORDER if any(s in systems for systems in timed.values())]
    head = ["op", "shape", "variant"]
    for system in present:
        head += [f"{system} ms", f"{system} MiB"]
    head += ["fusetune roofline", "fusetune kernel roofline", "fusetune speed vs best of " + "/".join(RIVALS)]
    rows = []
    for (op, shape, variant), systems in timed.items():
        row = [op, shape, variant]
        for system in present:
            row += [cell(systems, system, common.TIME, ".3f"),
                    cell(systems, system, common.MEMORY, ".0f")]
        ratio = common.speed_ratio(systems, "fusetune", RIVALS)
        row += [cell(systems, "fusetune", common.ROOFLINE, ".2f"),
                cell(systems, "fusetune", common.KERNEL_ROOFLINE, ".2f"),
                "" if ratio is None else f"{ratio:.2f}x"]
        rows.append(row)
    legend = {op: common.shape_legend(row["config"]) for (op, _, _), systems in timed.items()
              for metrics in systems.values() for row in metrics.values()}
    notes = ["", "Shapes: " + "; ".join(f"{op}: {names}" for op, names in legend.items()) + ".",
             "Times are medians of forward+backward in ms. MiB is the peak one forward+backward "
             "allocates above what was allocated before it: the inputs, and their gradients from the "
             "runs before it, which this one accumulates into (so their storage is not counted; an "
             "op that hands out a buffer it made, or writes into the logits as Liger's cross-entropy "
             "does, adds none for its gradient). Roofline is the minimum work over the "
             "measured copy bandwidth or bf16 matmul rate, divided by the time; kernel roofline divides "
             "by the step's device time alone (torch.profiler), which leaves out the gaps where the "
             "device waits for the host (runs without it predate the column); matmul is the "
             "bare bf16 matmuls of linear_cross_entropy, a floor rather than a competitor."]
    return ["### Ops", ""] + markdown(head, rows) + notes


def correctness_table(cases: dict) -> list[str]:
    """Max relative error of fusetune against its reference, per checked case."""
    rows = [[op, shape, variant, cell(systems, "fusetune", common.ERROR, ".2e"),
             "ok" if systems["fusetune"][common.ERROR].get("passed") else "FAIL"]
            for (op, shape, variant), systems in cases.items()
            if common.ERROR in systems.get("fusetune", {})]
    if not rows:
        return []
    return ["### Correctness (fusetune vs its reference, bf16)", ""] + markdown(
        ["op", "shape", "variant", "max rel error", "result"], rows)


def ceilings_line(cases: dict) -> list[str]:
    """The measured copy bandwidth and bf16 matmul rate the roofline fractions are taken against."""
    values = {metric: row["value"] for systems in cases.values()
              for metrics in systems.values() for metric, row in metrics.items()
              if metric in (common.COPY, common.MATMUL)}
    if not values:
        return []
    return [f"Ceilings: device-to-device copy {values.get(common.COPY, 0):.0f} GB/s "
            f"(read + write), bf16 matmul {values.get(common.MATMUL, 0):.1f} TFLOP/s."]


def e2e_label(row: dict) -> str:
    """A system's name in the end-to-end table (fusetune without activation offload, with its step
    replayed as a CUDA graph, recomputing attention, or keeping or recomputing the projections
    against the default, marked)."""
    config = row["config"]
    return (row["system"] + (" (no offload)" if config.get("offload") is False else "")
            + (" (graph)" if config.get("graph") else "")
            + (" (attention recomputed)" if config.get("keep_attention") is False else "")
            + {True: " (projections kept)", False: " (projections recomputed)"}.get(
                config.get("keep_projections"), ""))


def e2e_where(config: dict) -> str:
    """An end-to-end case in words: model, tokens (or mode) and variant."""
    size = f"{config['tokens']:,} tokens" if "tokens" in config else config["mode"].replace("_", " ")
    return f"{config['model']} {size} {config['variant']}"


def occupied_gib(peak_row: dict) -> float | None:
    """A peak_allocated_gib record's value, or for a captured step (``graph_footprint_gib``: static +
    the graph's private pool, which its replays occupy without allocating) that footprint if larger."""
    peak, footprint = peak_row.get("value"), peak_row.get("graph_footprint_gib")
    if peak is None or footprint is None:
        return peak
    return max(peak, footprint)


def e2e_order(label: str) -> tuple:
    """Sort key of a system label: the E2E_ORDER systems first, in that order."""
    order = {system: i for i, system in enumerate(E2E_ORDER)}
    return order.get(label.split()[0], len(order)), label


def by_case(key: tuple[str, str, str]) -> tuple:
    """Sort key of (model, variant, system label)."""
    return (*key[:2], e2e_order(key[2]))


def e2e_table(records: list[dict]) -> list[str]:
    """One row per fixed-length configuration and system: speed, step-time range, memory, step-1 loss
    and MFU (the padded / packed and max-context modes have their own tables)."""
    records = [row for row in records if "mode" not in row["config"]]
    if not records:
        return []
    cases: dict = {}
    for row in records:
        config = row["config"]
        key = (config["model"], config["tokens"], config["variant"])
        cases.setdefault(key, {}).setdefault(e2e_label(row), {})[row["metric"]] = row
    rows = []
    for (model, tokens, variant), systems in cases.items():
        for label in sorted(systems, key=e2e_order):
            metrics = systems[label]
            static = common.value(systems, label, "static_gib")
            peak = occupied_gib(metrics.get("peak_allocated_gib", {}))
            speed = metrics.get("tokens_per_s", {})
            steps = speed.get("step_s", [])[speed.get("steps", [0])[0]:]
            rows.append([model, f"{tokens:,}", variant, label, cell(systems, label, "tokens_per_s", ",.0f"),
                         f"{min(steps):.2f}-{max(steps):.2f}" if steps and speed["value"] else "",
                         cell(systems, label, "static_gib", ".2f"),
                         cell(systems, label, "peak_allocated_gib", ".2f") if peak is None else f"{peak:.2f}",
                         "" if static is None or peak is None else f"{peak - static:.2f}",
                         cell(systems, label, "peak_reserved_gib", ".2f"),
                         cell(systems, label, "loss", ".4f"), cell(systems, label, "mfu", ".3f")])
    versions = sorted({f"{row['system']} {row['system_version']}"
                       for row in records if row.get("system_version")})
    notes = ["", "Tokens/s counts the language model's tokens over the timed steps; step s is the fastest "
             "and slowest timed step. GiB = 2^30 bytes; static is allocated before the first step, peak - "
             "static is what training adds above the frozen weights (for a step replayed as a CUDA graph, "
             "\"(graph)\", peak is static + the graph's private pool where that is larger: its replays "
             "occupy the pool without allocating). Loss is step 1's (identical weights "
             "and batch in every system). MFU: 4 x matmul parameters + causal attention FLOPs per token "
             "over the H200's 989 TFLOP/s dense bf16.", "Versions: " + ", ".join(versions) + "."]
    return ["### End to end (LoRA r=16, batch 1, gradient checkpointing)", ""] + markdown(
        ["model", "tokens", "variant", "system", "tokens/s", "step s", "static GiB", "peak GiB",
         "peak - static", "reserved GiB", "loss", "MFU"], rows) + notes


def line_through(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Intercept and slope of the line through the last two of ``points`` ((x, y), x ascending);
    None with fewer than two."""
    if len(points) < 2:
        return None
    (x1, y1), (x2, y2) = points[-2:]
    slope = (y2 - y1) / (x2 - x1)
    return y2 - slope * x2, slope


def fit_tokens(probes: list, used: str, total: str, reserve: float) -> int | None:
    """The length at which the line through the two longest passing probes' ``used`` GiB reaches the
    ``total`` GiB (the longest probe's) less ``reserve``; None with fewer than two probes that
    recorded ``used``, no ``total`` or a non-positive slope. ``probes``: [[tokens, metrics]]."""
    points = [(tokens, metrics[used]) for tokens, metrics in sorted(probes, key=lambda probe: probe[0])
              if metrics.get(used) is not None]
    line = line_through(points)
    limit = max(probes, key=lambda probe: probe[0])[1].get(total) if probes else None
    if line is None or limit is None or line[1] <= 0:
        return None
    intercept, slope = line
    return int((limit - reserve - intercept) / slope)


def offloads(row: dict) -> bool:
    """Whether a system keeps activations in host memory (Unsloth; fusetune unless ``offload`` is off)."""
    system = row["system"]
    return system == "unsloth" or (system == "fusetune" and row["config"].get("offload") is not False)


def project_context(row: dict) -> tuple[int, str] | None:
    """A max_context_tokens record's projected longest context and the bound that sets it ("GPU" or
    "host"): :func:`fit_tokens` of the peak allocated against the device's memory and, for a system
    that offloads, of the peak host memory against the host's, the smaller taken. None when neither fits."""
    probes = row.get("probe_metrics") or []
    bounds = {"GPU": fit_tokens(probes, "peak_allocated_gib", "device_total_gib", DEVICE_RESERVE_GIB)}
    if offloads(row):
        bounds["host"] = fit_tokens(probes, "host_peak_gib", "host_total_gib", HOST_RESERVE_GIB)
    fitted = [(tokens, bound) for bound, tokens in bounds.items() if tokens is not None]
    return min(fitted) if fitted else None


def measured_longest(row: dict) -> str:
    """The measured longest length as shown: ">= " when the ceiling or the budget stopped the search,
    what failed at the shortest length when nothing passed."""
    value = row["value"]
    if value is None:
        return failure_kind(row["error"].split(": ", 1)[-1])
    bound = not row["complete"] or value >= row["ceiling"]
    return (">= " if bound else "") + f"{value:,}" + ("" if row["complete"] else " (incomplete)")


def ratio(value: float | None, reference: float | None) -> str:
    """``value / reference`` as "1.23x"; blank when either is missing."""
    return f"{value / reference:.2f}x" if value and reference else ""


def context_table(records: list[dict]) -> list[str]:
    """The longest batch-1 context each system trained (``bench/e2e.py --max-context``), against
    Unsloth's, with its projection from the probes' memory (:func:`project_context`), the speed and
    memory of the longest step and what stopped the next length."""
    found = {(row["config"]["model"], row["config"]["variant"], e2e_label(row)): row
             for row in records if row["metric"] == "max_context_tokens"}
    if not found:
        return []
    projected = {key: project_context(row) or (None, None) for key, row in found.items()}
    rows = []
    for (model, variant, label), row in sorted(found.items(), key=lambda item: by_case(item[0])):
        at_max, (reach, bound) = row.get("at_max") or {}, projected[model, variant, label]
        unsloth = found.get((model, variant, "unsloth"), {}).get("value")
        unsloth_projected = projected.get((model, variant, "unsloth"), (None, None))[0]
        failures = sorted((tokens, outcome) for tokens, outcome in row.get("probes", []) if outcome != "ok")
        speed, peak = at_max.get("tokens_per_s"), at_max.get("peak_allocated_gib")
        rows.append([model, variant, label, measured_longest(row), ratio(row["value"], unsloth),
                     "" if reach is None else f"{reach:,} ({bound})", ratio(reach, unsloth_projected),
                     "" if speed is None else f"{speed:,.0f}", "" if peak is None else f"{peak:.2f}",
                     str(len(row.get("probes", []))),
                     f"{failures[0][0]:,}: {failure_kind(failures[0][1])}" if failures else ""])
    notes = ["", "Each probe is its own worker at one length (double from the start until one fails, then "
             "bisect to the resolution); tokens/s and peak GiB are those of the longest passing probe. "
             ">= marks a search stopped by the ceiling or the budget (incomplete: rerunning the same command "
             "resumes it). First failure: the shortest length that failed, and why.",
             "Only the longest tokens column is a result. Projected longest is NOT a trained length but a "
             "linear extrapolation of measured peaks: the line through the peak allocated GiB of the two "
             "longest passing probes (activations grow linearly in tokens with SDPA attention and "
             f"checkpointing), solved for the GPU's memory less {DEVICE_RESERVE_GIB:g} GiB; for systems "
             "that offload activations (Unsloth, fusetune with offload) also the worker's peak host memory "
             f"against the host's less {HOST_RESERVE_GIB:g} GiB, the smaller taken; GPU or host says which "
             "bound binds. It ignores step time, fragmentation and anything that grows faster than linearly; "
             "where the search found its limit, the two columns show how far to trust it."]
    return ["### Longest trainable context (batch 1)", ""] + markdown(
        ["model", "variant", "system", "longest tokens", "vs Unsloth", "projected longest (bound)",
         "projected vs Unsloth", "tokens/s there", "peak GiB there", "probes", "first failure"], rows) + notes


def packed_table(records: list[dict]) -> list[str]:
    """The same mixed-length samples padded and packed, per system: real tokens/s of each, the speed-up,
    peak memory and the mean loss of each (packing is exact, so the losses should agree)."""
    cases: dict = {}
    for row in records:
        config = row["config"]
        if config.get("mode") in ("padded", "packed"):
            key = (config["model"], config["variant"], e2e_label(row))
            cases.setdefault(key, {}).setdefault(config["mode"], {})[row["metric"]] = row
    if not cases:
        return []
    rows = []
    for (model, variant, label), modes in sorted(cases.items(), key=lambda item: by_case(item[0])):
        padded, packed = (common.value(modes, mode, "tokens_per_s") for mode in ("padded", "packed"))
        speed = modes.get("padded", {}).get("tokens_per_s", {})
        share = sum(speed.get("real_tokens", [])) / max(sum(speed.get("batch_tokens", [])), 1)
        rows.append([model, variant, label, f"{share:.2f}" if speed.get("batch_tokens") else "",
                     cell(modes, "padded", "tokens_per_s", ",.0f"),
                     cell(modes, "packed", "tokens_per_s", ",.0f"),
                     f"{packed / padded:.2f}x" if padded and packed else "",
                     cell(modes, "padded", "peak_allocated_gib", ".2f"),
                     cell(modes, "packed", "peak_allocated_gib", ".2f"),
                     cell(modes, "padded", "loss", ".4f"), cell(modes, "packed", "loss", ".4f")])
    notes = ["", "The same seeded samples (one image of 224-896 pixels a side and 128-2,048 text tokens "
             "each) in the same order, a batch of them a step: padded to the longest, or packed into one row "
             "(fusetune.train.packing). Tokens/s counts real (non-pad) tokens over the timed steps; real "
             "share is real over padded-batch tokens; loss is the mean over all steps."]
    return ["### Packed against padded (mixed image sizes and text lengths)", ""] + markdown(
        ["model", "variant", "system", "real share", "padded tokens/s", "packed tokens/s", "packed / padded",
         "padded peak GiB", "packed peak GiB", "padded loss", "packed loss"], rows) + notes


def errors_list(records: list[dict]) -> list[str]:
    """Each distinct failure once, with the cases it hit."""
    seen: dict[tuple[str, str], list[str]] = {}
    for row in records:
        if row["value"] is None:
            config = row["config"]
            if "op" in config:
                where = f"{config['op']} {common.shape_text(config)} {config.get('variant', '')}"
            else:
                where = e2e_where(config)
            cases = seen.setdefault((row["system"], row["error"]), [])
            if where not in cases:
                cases.append(where)
    if not seen:
        return []
    lines = ["### Failures", ""]
    for (system, error), cases in seen.items():
        lines.append(f"- **{system}** ({len(cases)} case(s), e.g. {cases[0]}): `{error}`")
    return lines


def section(name: str, records: list[dict]) -> str:
    """The Markdown section for one results file, markers included."""
    if name.startswith("e2e-"):
        parts = [[f"## {name}", "", header(records)], e2e_table(records), context_table(records),
                 packed_table(records), errors_list(records)]
    else:
        cases = common.index(records)
        parts = [[f"## {name}", "", header(records)], ceilings_line(cases), correctness_table(cases),
                 ops_table(cases), errors_list(records)]
    body = "\n\n".join("\n".join(part) for part in parts if part)
    return f"<!-- begin {name} -->\n{body}\n<!-- end {name} -->"


def replace_section(document: str, name: str, text: str) -> str:
    """``document`` with the section ``name`` replaced by ``text`` (appended when absent)."""
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->",
                         re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: text, document)
    return document.rstrip("\n") + "\n\n" + text + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    document = args.out.read_text() if args.out.exists() else TITLE
    for path in sorted(args.results.glob("ops-*.jsonl")) + sorted(args.results.glob("e2e-*.jsonl")):
        records = load(path)
        if records:
            document = replace_section(document, path.name, section(path.name, records))
    args.out.write_text(document)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
