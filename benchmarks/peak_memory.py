"""Peak memory of this process, as the benchmarks and the memory tests
measure it: VmHWM from /proc/self/status, the high-water mark of this
process's own address space, which exec starts afresh. (ru_maxrss is not
used: Linux carries it over exec from the parent, so a child of a bigger
parent could show no growth at all.) Before the measured work the
high-water mark is reset to the current RSS where the kernel allows it
(clear_refs, Linux 4.0 and later), so that a transient peak while importing
torch cannot hide the work's.

Standard library only, so that a test's child process can import it.
"""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_baseline() -> tuple[int, str]:
    """The RSS (KiB) from which the work's peak is measured, and how."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        return status_kib("VmRSS"), "VmHWM, reset to VmRSS before the save"
    except OSError:
        return status_kib("VmHWM"), "VmHWM growth (no reset: clear_refs refused)"


def peak_kib() -> int:
    """The process's peak RSS (KiB) since exec or memory_baseline()."""
    return status_kib("VmHWM")
