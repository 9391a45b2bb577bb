"""Every target the benchmark checks, in one place, and how a run is judged
against them. The reports print and plot what check() returns.

Time targets are ratios to the scenario's reference (scenarios.py: raw
writing's time, or max(P, W) / W for producer scenarios), measured in the
same run. Memory targets bound the peak RSS growth of the measuring process
(VmHWM, see measure.py) by the scenario's largest tensor plus a slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ANY = "*"  # a target for every scenario in which its methods ran


@dataclass(frozen=True)
class Target:
    scenario: str  # or ANY
    method: str
    time_limit: Optional[float] = None  # time <= this x the scenario's reference
    # peak RSS growth <= memory_tensors x the largest tensor + this
    memory_slack_mib: Optional[float] = None
    memory_tensors: float = 1.0
    # Measure memory above this method's peak rather than above the
    # process's baseline, so that what both hold besides tensors cancels out.
    memory_over: Optional[str] = None
    why: str = ""  # what the target stands for, for the reports


TARGETS = (
    # The in-turn mode: no slower than writing alone by more than these.
    Target("large", "trinity_stream_saver", 1.10, 16, why="streaming costs next to nothing"),
    Target("many_small", "trinity_stream_saver", 1.5, why="per-tensor overhead"),
    Target("noncontig", "trinity_stream_saver", 1.6, 64, why="one bounded buffer per tensor"),
    # Sharding costs little over one file written by the same saver.
    Target("sharded", "trinity_sharded", 1.10, 16, why="shards and an index cost next to nothing"),
    # overlap=True against the best a two-stage pipeline can do.
    Target("slow_producer", "trinity_overlap", 1.15, why="uniform tensors"),
    Target("gpu_producer", "trinity_overlap", 1.15, why="a real GPU producer"),
    Target("llama", "trinity_overlap", 1.25, why="model-shaped, producer as fast as the writer"),
    Target("llama_2x", "trinity_overlap", 1.10, why="model-shaped, producer twice as fast"),
    Target("moe", "trinity_overlap", 1.25, why="many small experts, producer as fast"),
    Target("moe_2x", "trinity_overlap", 1.10, why="many small experts, producer twice as fast"),
    # A model's own distinct tensors, saved again and again in one process.
    Target("model_repeated", "trinity_overlap", 1.05,
           why="overlap never slower than in turn, on a model's own tensors"),
    Target("model_repeated_paced", "trinity_overlap", 1.25,
           why="a model's own tensors, producer as fast as the writer"),
    # overlap=True's memory contract: beyond what the in-turn mode holds,
    # the tensor being written and a queue of at most max_queued_bytes
    # (by default the largest tensor).
    Target(ANY, "trinity_overlap", memory_slack_mib=16, memory_tensors=2,
           memory_over="trinity_stream_saver",
           why="overlap holds the tensor being written and a queue of at most the largest tensor"),
)


def for_scenario(name: str) -> list[Target]:
    return [t for t in TARGETS if t.scenario in (name, ANY)]


def time_limit(name: str, method: str) -> Optional[float]:
    """The time target of a method in a scenario, if it has one (for the plot)."""
    for target in TARGETS:
        if target.scenario == name and target.method == method and target.time_limit:
            return target.time_limit
    return None


def _size(mib: float) -> str:
    if mib < 1:
        return f"{mib * 1024:.1f} KiB"
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def describe(target: Target, reference_label: str, tensor_mib: float) -> str:
    parts = []
    if target.time_limit is not None:
        parts.append(f"time <= {target.time_limit:.2f}x {reference_label}")
    if target.memory_slack_mib is not None:
        limit = target.memory_tensors * tensor_mib + target.memory_slack_mib
        over = f" above {target.memory_over}'s" if target.memory_over else ""
        tensors = "largest tensor" if target.memory_tensors == 1 else (
            f"{target.memory_tensors:g} x largest tensor")
        parts.append(f"peak RSS growth{over} <= {tensors} + "
                     f"{target.memory_slack_mib:.0f} MiB ({_size(limit)})")
    return ", ".join(parts)


def check(name: str, summary: dict) -> list[dict]:
    """Each target of this scenario judged on the run's summary (report.py):
    PASS, FAIL, or N/A where its method (or the method it is measured
    against) did not run."""
    rows = summary["methods"]
    results = []
    for target in for_scenario(name):
        row = rows.get(target.method, {})
        over = rows.get(target.memory_over, {}) if target.memory_over else {}
        if target.scenario == ANY and ("median_s" not in row or
                                       (target.memory_over and "median_s" not in over)):
            continue  # a target for wherever both ran: not this scenario
        entry = {"scenario": name, "method": target.method, "why": target.why,
                 "target": describe(target, summary["reference_label"], summary["tensor_mib"])}
        if "median_s" not in row or (target.memory_over and "median_s" not in over):
            entry.update(result="N/A", measured="not run")
            results.append(entry)
            continue
        parts, ok = [], bool(row.get("verified", True))
        if target.time_limit is not None:
            ratio = row.get("ratio")
            parts.append(f"{ratio:.2f}x" if ratio else "no reference")
            ok = ok and ratio is not None and ratio <= target.time_limit
        if target.memory_slack_mib is not None:
            memory = row["max_rss_growth_mib"] - (over["max_rss_growth_mib"] if over else 0.0)
            parts.append(f"{memory:.0f} MiB")
            ok = ok and memory <= (target.memory_tensors * summary["tensor_mib"]
                                   + target.memory_slack_mib)
        if not row.get("verified", True):
            parts.append("file did not verify")
        entry.update(result="PASS" if ok else "FAIL", measured=", ".join(parts))
        results.append(entry)
    return results
