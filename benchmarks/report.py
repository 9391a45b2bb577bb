"""What a run's measurements say: medians and ratios per scenario
(summarise), the tables printed after each scenario and at the end, and the
plot. Knows scenarios and methods only through their records; judging
against targets is targets.py's.
"""

from __future__ import annotations

import math
import statistics

import methods
import targets
from scenarios import MIB, SCENARIOS, largest_bytes, total_bytes


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def summarise(name: str, cfg: dict, spec, results: dict) -> dict:
    """Medians, ratios to the scenario's reference, and the targets judged."""
    scenario = SCENARIOS[name]
    total = total_bytes(spec)
    base_runs = results.get(scenario.baseline, [])
    summary = {"total_mib": total / MIB, "tensor_mib": largest_bytes(spec) / MIB,
               "tensors": len(spec), "baseline_method": scenario.baseline,
               "reference": scenario.reference, "reference_label": scenario.reference_label,
               "methods": {}}
    if scenario.times_producer:
        produce, write = median_of(base_runs, "produce_s"), median_of(base_runs, "write_s")
        summary["produce_s"], summary["write_s"] = produce, write
        summary["sleep_s"] = cfg.get("sleep_s_per_byte", 0.0) * total
        reference = None
        if produce is not None and write is not None:
            reference = write if scenario.reference == "W" else max(produce, write)
    else:
        reference = median_of(base_runs, "seconds")
    summary["reference_s"] = reference
    for method, runs in results.items():
        row = {"runs_s": [r["seconds"] for r in runs]}
        seconds = median_of(runs, "seconds")
        if seconds is not None:
            row["median_s"] = seconds
            row["best_s"] = min(row["runs_s"])
            row["throughput_mib_s"] = total / MIB / seconds
            row["ratio"] = seconds / reference if reference else None
            row["rss_growth_mib"] = median_of(runs, "rss_growth_mib")
            row["max_rss_growth_mib"] = max(r["rss_growth_mib"] for r in runs)
            row["baseline_rss_mib"] = median_of(runs, "baseline_rss_mib")
            if any("verified" in r for r in runs):
                failures = [r.get("verify_error") for r in runs if r.get("verified") is False]
                row["verified"] = not failures
                if failures:
                    row["verify_error"] = failures[-1]
        summary["methods"][method] = row
    summary["targets"] = targets.check(name, summary)
    return summary


def _label(method: str) -> str:
    return methods.method(method).label


# --------------------------------------------------------------------------
# Tables.
# --------------------------------------------------------------------------


def print_scenario(name: str, cfg: dict, spec, summary: dict) -> None:
    scenario = SCENARIOS[name]
    print(f"\n### {name}: {scenario.describe(cfg, spec)}")
    produce, write = summary.get("produce_s"), summary.get("write_s")
    if produce is not None and write is not None:
        if scenario.producer_speed:
            sleep = summary["sleep_s"]
            how = f"{sleep:.2f} s of it waiting, the rest handing out staging buffers"
        else:
            how = "copying the tensors from the GPU"
        print(f"P (producing alone) {produce:.2f} s ({how}); W (writing alone) {write:.2f} s "
              f"(medians of {scenario.baseline}'s runs): max {max(produce, write):.2f} s, "
              f"one after the other {produce + write:.2f} s")
        overlap = summary["methods"].get("trinity_overlap", {}).get("median_s")
        if overlap is not None and produce + write > max(produce, write):
            hidden = (produce + write - overlap) / min(produce, write)
            print(f"overlap=True hid {hidden:.0%} of the shorter of the two "
                  f"(100%: time = max(P, W), 0%: time = P + W)")
    reference = summary["reference_label"]
    print(f"\n| method | median time (s) | vs {reference} | throughput (MiB/s) "
          f"| peak RSS growth (MiB) | each round (s) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for method, row in summary["methods"].items():
        if "median_s" not in row:
            print(f"| {_label(method)} | not run | | | | |")
            continue
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "n/a"
        rounds = ", ".join(f"{s:.2f}" for s in row["runs_s"])
        flag = "" if row.get("verified", True) else " (FILE DID NOT VERIFY)"
        print(f"| {_label(method)}{flag} | {row['median_s']:.2f} | {ratio} | "
              f"{row['throughput_mib_s']:.0f} | {row['rss_growth_mib']:.0f} | {rounds} |")
    print()
    for entry in summary["targets"]:
        print(f"target, {_label(entry['method'])}: {entry['target']}: "
              f"{entry['result']} ({entry['measured']})")
    for method, row in summary["methods"].items():
        if row.get("verified"):
            print(f"verified: {_label(method)}'s file (header in full, values of sampled tensors)")
        elif "verify_error" in row:
            print(f"NOT VERIFIED: {_label(method)}: {row['verify_error']}")


def print_targets(report: dict) -> None:
    print("\n## Targets in this run\n")
    print("| scenario | method | target | measured | result |")
    print("| --- | --- | --- | --- | --- |")
    for name, entry in report["scenarios"].items():
        for check in entry["summary"]["targets"]:
            print(f"| {name} | {_label(check['method'])} | {check['target']} "
                  f"| {check['measured']} | {check['result']} |")


def print_overview(report: dict) -> None:
    """One row per scenario, one column per method: the README's table."""
    names = list(report["scenarios"])
    used = sorted({m for n in names for m in report["scenarios"][n]["summary"]["methods"]},
                  key=methods.order)
    print("\n## All scenarios (median time, vs the reference, peak RSS growth)\n")
    print("| scenario (reference) | " + " | ".join(_label(m) for m in used) + " |")
    print("| --- |" + " --- |" * len(used))
    for name in names:
        summary = report["scenarios"][name]["summary"]
        cells = []
        for method in used:
            row = summary["methods"].get(method, {})
            if "median_s" not in row:
                cells.append("")
                continue
            ratio = f", {row['ratio']:.2f}x" if row.get("ratio") else ""
            cells.append(f"{row['median_s']:.2f} s{ratio}, {row['rss_growth_mib']:.0f} MiB")
        reference = summary["reference_label"]
        if summary.get("reference_s"):
            reference += f" = {summary['reference_s']:.2f} s"
        print(f"| {name} ({reference}) | " + " | ".join(cells) + " |")


def print_producers(report: dict) -> None:
    """The producer scenarios as overlap sees them: P, W, in turn,
    overlap=True and the ratio its target is set on."""
    rows = [(n, e["summary"]) for n, e in report["scenarios"].items()
            if e["summary"].get("produce_s") is not None]
    if not rows:
        return
    print("\n## Producer scenarios: overlapping producing with writing\n")
    print("| scenario | P (produce alone) | W (write alone) | in turn | overlap=True "
          "| overlap vs reference | target | raw writer thread, queue 8 deep |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")

    def cell(summary, method, ratio=False):
        row = summary["methods"].get(method, {})
        if "median_s" not in row:
            return ""
        return f"{row['ratio']:.2f}x" if ratio else f"{row['median_s']:.2f} s"

    for name, summary in rows:
        limit = targets.time_limit(name, "trinity_overlap")
        checks = [c for c in summary["targets"]
                  if c["method"] == "trinity_overlap" and "time" in c["target"]]
        result = f"<= {limit:.2f}x: {checks[0]['result']}" if limit and checks else ""
        queue = cell(summary, "raw_queue_thread")
        if queue:
            queue += f" ({cell(summary, 'raw_queue_thread', ratio=True)})"
        print(f"| {name} | {summary['produce_s']:.2f} s | {summary['write_s']:.2f} s "
              f"| {cell(summary, 'trinity_stream_saver')} | {cell(summary, 'trinity_overlap')} "
              f"| {cell(summary, 'trinity_overlap', ratio=True)} vs {summary['reference_label']} "
              f"| {result} | {queue} |")


# --------------------------------------------------------------------------
# The plot.
# --------------------------------------------------------------------------


def plot(report: dict, path: str, columns: int = 5) -> None:
    """Per scenario two panels: time as a ratio to the scenario's reference,
    and peak RSS growth; each target drawn as a red dashed line labelled
    with the method it is for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    columns = max(2, min(columns, len(names)))
    blocks = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(2 * blocks, columns, figsize=(4.6 * columns, 7.2 * blocks),
                                squeeze=False)
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods.METHODS)}
    for ax in axes.flat:
        ax.set_visible(False)
    first_of_block: list = []
    for index, name in enumerate(names):
        summary = report["scenarios"][name]["summary"]
        rows = [(m, r) for m, r in summary["methods"].items() if "median_s" in r]
        labels = [_label(m) for m, _ in rows]
        block, column = divmod(index, columns)
        if column == 0:
            first_of_block = labels
        # Labels on the block's first panel, and on any whose methods differ.
        shown = labels if column == 0 or labels != first_of_block else [""] * len(rows)
        for line, (key, title, unit) in enumerate((
            ("ratio", f"time vs {summary['reference_label']}",
             f"times {summary['reference_label']}"),
            ("rss_growth_mib", "peak RSS growth", "MiB"),
        )):
            ax = axes[2 * block + line][column]
            ax.set_visible(True)
            values = [r.get(key) or 0.0 for _, r in rows]
            ax.barh(range(len(rows)), values,
                    color=[colours.get(m, colours["raw_os_write"]) for m, _ in rows])
            ax.set_yticks(range(len(rows)), shown, fontsize=7)
            ax.invert_yaxis()
            for y, value in enumerate(values):
                text = f" {value:.2f}x" if key == "ratio" else f" {value:,.0f}"
                ax.text(value, y, text, va="center", fontsize=7)
            ax.set_xlabel(unit)
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.margins(x=0.3)
            if key == "rss_growth_mib" and values and max(values) > 8 * max(1.0, min(values)):
                # One tensor next to a whole model: only a log scale shows both.
                ax.set_xscale("log")
                ax.set_xlim(left=1, right=max(values) * 4)
            for limit, text in _target_lines(name, summary, key):
                ax.axvline(limit, color="red", linestyle="--", linewidth=1)
                ax.text(limit, len(rows) - 0.5, f" target: {text}", color="red", fontsize=7)
    figure.suptitle(f"trinity_stream_saver benchmark: {report['dir_kind']}, "
                    f"{report['rounds']} rounds, medians; red dashed lines: targets",
                    fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _target_lines(name: str, summary: dict, key: str) -> list:
    """Where this scenario's targets sit on a panel, with their labels."""
    lines = []
    for target in targets.for_scenario(name):
        who = {"trinity_overlap": "overlap=True", "trinity_sharded": "sharded"}.get(
            target.method, "in turn")
        if key == "ratio" and target.time_limit:
            lines.append((target.time_limit, f"{who} <= {target.time_limit:.2f}x"))
        if key == "rss_growth_mib" and target.memory_slack_mib and not target.memory_over:
            limit = target.memory_tensors * summary["tensor_mib"] + target.memory_slack_mib
            lines.append((limit, f"{who} <= {limit:.0f} MiB"))
    return lines
