"""Side-by-side benchmark of trinity_stream_saver against the other ways of
writing the same tensors: time, throughput and peak memory per scenario,
with the targets (benchmarks/targets.py) checked in the same run.

Every method runs in a fresh process (benchmarks/measure.py, which reads its
own peak memory from VmHWM), methods interleaved over several rounds in a
rotating order, with the output deleted and os.sync() called before every
run. The tables show medians and the ratio to each scenario's reference:
raw writing's time, or for producer scenarios max(P, W) or W, where P is
the time spent producing the tensors and W the time spent writing them,
both from raw writing's runs. Producers that wait in proportion to each
tensor's size are calibrated from raw writing's speed in the same run.
Every file this project writes is checked: its header in full, a few
tensors' values.

    python benchmarks/bench.py                                # the default scenarios
    python benchmarks/bench.py --dir /dev/shm                 # take the disk out
    python benchmarks/bench.py --scenarios llama,llama_2x,moe,moe_2x --dir /dev/shm
    python benchmarks/bench.py --scale 0.1 --rounds 1         # a quick look
    python benchmarks/bench.py --scenarios gpu_llama --methods trinity_stream_saver,trinity_overlap
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# None of these imports torch: this process stays small (see measure.py).
import methods  # noqa: E402
import report
import targets  # noqa: E402
from scenarios import SCENARIOS, largest_bytes, total_bytes  # noqa: E402

MEASURE = os.path.join(HERE, "measure.py")
PROBE = """import inspect, json, trinity_stream_saver as t
print(json.dumps({"module": t.__file__,
                  "signature": str(inspect.signature(t.save_safetensors_streaming))}))"""


# --------------------------------------------------------------------------
# Running the children.
# --------------------------------------------------------------------------


def run_python(args: list[str]) -> dict:
    """Runs Python in a fresh process and returns its last line as JSON; a
    child that fails ends the benchmark, with the child's stderr shown.
    There is no retry: a crash is not timing noise, and a retry could hide
    an intermittent bug in the saver."""
    child = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"{child.stderr.rstrip()}\nchild failed with exit status "
                         f"{child.returncode}: python {' '.join(args)}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def clear(directory: str) -> None:
    """Every run starts from the same state: no file to replace (replacing
    one makes ext4 flush it) and no dirty pages left by the previous run to
    throttle this one's writes."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.sync()


def run_method(cfg: dict, method: str, work: str) -> dict:
    """One measured run in a directory of its own; what the method wrote
    there is counted, then removed."""
    directory = os.path.join(work, "run")
    path = os.path.join(directory, f"{method}.safetensors")
    clear(directory)
    result = run_python([MEASURE, json.dumps({"cfg": cfg, "method": method, "path": path})])
    result["file_bytes"] = sum(os.path.getsize(os.path.join(directory, name))
                               for name in os.listdir(directory))
    clear(directory)
    return result


# --------------------------------------------------------------------------
# Scenarios: configuration, calibration, rounds.
# --------------------------------------------------------------------------


def scenario_config(name: str, args) -> dict:
    """The scenario's sizes: given on the command line, or the default
    multiplied by --scale where the size scales."""
    cfg = {"scenario": name}
    for size in SCENARIOS[name].sizes:
        value = getattr(args, size.flag.replace("-", "_"))
        if value is None and size.default is not None:
            value = size.default
            if size.scaled and args.scale != 1.0:
                value = max(1, round(size.default * args.scale))
        cfg[size.key] = value
    return cfg


def calibrate(cfg: dict, work: str, runs: int) -> dict:
    """Raw writing of the scenario's tensors from a producer at full speed:
    W (writing alone) and P0 (what producing costs without waiting). The
    first run is not counted: the first write after a quiet spell pays for
    waking the file system and the page cache up."""
    fast = dict(cfg, sleep_s_per_byte=0.0)
    baseline = SCENARIOS[cfg["scenario"]].baseline
    run_method(fast, baseline, work)
    results = [run_method(fast, baseline, work) for _ in range(runs)]
    return {"runs": results,
            "produce_s": statistics.median(r["produce_s"] for r in results),
            "write_s": statistics.median(r["write_s"] for r in results)}


def set_producer_wait(name: str, cfg: dict, spec, args, work: str, calibrations: dict) -> dict:
    """Sets cfg's wait per byte so that producing takes W / speed in all.
    Scenarios with the same tensors (llama and llama_2x) share one
    calibration."""
    scenario = SCENARIOS[name]
    if cfg.get("sleep_ms") is not None:  # given: per largest tensor
        cfg["sleep_s_per_byte"] = cfg["sleep_ms"] / 1000 / largest_bytes(spec)
        return {}
    key = json.dumps([scenario.baseline, spec])
    if key not in calibrations:
        calibrations[key] = calibrate(cfg, work, args.calibration_runs)
        print(f"  calibrated at full speed: P0 {calibrations[key]['produce_s']:.2f} s, "
              f"W {calibrations[key]['write_s']:.2f} s", flush=True)
    calibration = calibrations[key]
    wait = max(0.0, calibration["write_s"] / scenario.producer_speed - calibration["produce_s"])
    cfg["sleep_s_per_byte"] = wait / total_bytes(spec)
    return calibration


def methods_for(name: str, chosen) -> list[str]:
    """The scenario's own methods (or those chosen that may run here), and
    its baseline always."""
    scenario = SCENARIOS[name]
    wanted = set(scenario.methods if chosen is None else chosen) - set(scenario.excluded)
    return sorted(wanted | {scenario.baseline}, key=methods.order)


def run_scenario(name: str, args, work: str, calibrations: dict) -> dict:
    scenario = SCENARIOS[name]
    cfg = scenario_config(name, args)
    spec = scenario.spec(cfg)
    chosen = parse_methods(args.methods) if args.methods else None
    names = methods_for(name, chosen)
    entry = {"config": cfg, "load_before": os.getloadavg()}
    print(f"\n{name}: {scenario.describe(cfg, spec)}; {', '.join(names)}", flush=True)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: "
              f"other work is running, times will be noisy)", flush=True)
    if scenario.producer_speed:
        entry["calibration"] = set_producer_wait(name, cfg, spec, args, work, calibrations)
    if args.warmup:
        # The first write after a quiet spell pays for waking the file
        # system and the page cache up; no method should be charged for it.
        entry["warmup"] = run_method(cfg, scenario.baseline, work)
    results = {m: [] for m in names}
    for round_index in range(args.rounds):
        # A rotating order, so that no method always runs first or right
        # after the same neighbour.
        shift = round_index % len(names)
        for method in names[shift:] + names[:shift]:
            result = run_method(cfg, method, work)
            result["round"] = round_index
            results[method].append(result)
            print(f"  round {round_index + 1} {method}: {result['seconds']:.2f} s", flush=True)
    entry["load_after"] = os.getloadavg()
    entry["runs"] = results
    entry["summary"] = report.summarise(name, cfg, spec, results)
    report.print_scenario(name, cfg, spec, entry["summary"])
    return entry


# --------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------


def filesystem_of(path: str) -> str:
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def parse_scenarios(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario: {', '.join(unknown)} "
                         f"(choose from {', '.join(SCENARIOS)})")
    return chosen


def parse_methods(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = []
    for item in chosen:
        try:
            methods.method(item)
        except KeyError:
            unknown.append(item)
    if unknown:
        raise SystemExit(f"unknown method: {', '.join(unknown)} "
                         f"(choose from {', '.join(methods.METHODS)}, raw_pwrite_xN)")
    return chosen


def _listing() -> str:
    lines = ["scenarios (* run by default):"]
    for scenario in SCENARIOS.values():
        lines.append(f"  {'*' if scenario.default else ' '} {scenario.name:14} {scenario.summary}")
    lines.append("\nmethods (each scenario runs its own unless --methods is given):")
    for method in methods.METHODS.values():
        lines.append(f"    {method.name:22} {method.label}")
    lines.append(f"    {'raw_pwrite_xN':22} raw pwrite, each tensor over N threads (any N)")
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # A size's default depends on --scale: its help says it instead.
        if action.default is None and action.option_strings[0] not in ("--dir", "--methods"):
            return action.help
        return super()._get_help_string(action)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, epilog=_listing(),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--dir", default=None,
                        help="where to write; a fresh folder is made inside it and removed "
                             "after (None: the temp dir; /dev/shm takes the disk out)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every method, interleaved")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the unmeasured run of the baseline before each scenario")
    parser.add_argument("--scenarios",
                        default=",".join(s.name for s in SCENARIOS.values() if s.default),
                        help="comma-separated, from the list below")
    parser.add_argument("--methods", default=None,
                        help="comma-separated; each scenario runs those of them that apply "
                             "to it, and its baseline always (None: each scenario's own)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every scenario's default size (e.g. 0.1 for a quick "
                             "look); sizes given below are taken as they are")
    parser.add_argument("--calibration-runs", type=int, default=3,
                        help="producer scenarios: raw runs at full speed that set the wait")
    sizes = parser.add_argument_group("sizes (defaults before --scale)")
    seen = set()
    for scenario in SCENARIOS.values():
        for size in scenario.sizes:
            if size.flag not in seen:  # llama and llama_2x share theirs
                seen.add(size.flag)
                sizes.add_argument(f"--{size.flag}", type=type(size.default or 0.0), default=None,
                                   help=f"{size.help} (default {size.default})")
    parser.add_argument("--report", metavar="JSON", default=None,
                        help="measure nothing: print the tables and targets of a saved run "
                             "(its --json file) and draw its plot again")
    parser.add_argument("--plot", default=os.path.join(HERE, "results.png"), help="PNG to write")
    parser.add_argument("--json", default=os.path.join(HERE, "results.json"),
                        help="every measurement, as JSON")
    return parser.parse_args()


def show(results: dict, plot: str) -> None:
    report.print_overview(results)
    report.print_producers(results)
    report.print_targets(results)
    report.plot(results, plot)


def main() -> int:
    args = parse_args()
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        for name, entry in results["scenarios"].items():
            # Judged again: the targets may have changed since the run.
            entry["summary"]["targets"] = targets.check(name, entry["summary"])
        show(results, args.plot)
        print(f"\nplot in {args.plot}")
        return 0
    scenarios = parse_scenarios(args.scenarios)
    if args.methods:
        parse_methods(args.methods)
    need_cuda = [name for name in scenarios if SCENARIOS[name].needs_cuda]
    if need_cuda:
        probe_cuda = subprocess.run([sys.executable, "-c", "import torch; "
                                     "raise SystemExit(not torch.cuda.is_available())"])
        if probe_cuda.returncode != 0:
            raise SystemExit(f"{', '.join(need_cuda)} need a CUDA device, and torch sees none "
                             f"here: leave them out of --scenarios")
    probe = run_python(["-c", PROBE])
    work = tempfile.mkdtemp(prefix="tss-bench-", dir=args.dir)
    started = time.monotonic()
    print(f"trinity_stream_saver from {probe['module']}")
    print(f"writing to {work} ({filesystem_of(work)}), {args.rounds} rounds, each method in a "
          f"fresh process, {os.cpu_count()} CPUs", flush=True)
    results = {
        "command": [sys.executable, *sys.argv],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "dir": work, "dir_kind": f"{os.path.dirname(work)} ({filesystem_of(work)})",
        "filesystem": filesystem_of(work), "rounds": args.rounds, "scale": args.scale,
        "trinity": probe, "scenarios": {},
    }
    calibrations: dict = {}
    try:
        for name in scenarios:
            results["scenarios"][name] = run_scenario(name, args, work, calibrations)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.monotonic() - started
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    show(results, args.plot)
    print(f"\nwall time {results['wall_s']:.0f} s; raw measurements in {args.json}, "
          f"plot in {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
