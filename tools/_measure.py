"""What the memory benchmarks in tools/ share: this process's resident memory, as Linux's /proc reports it.

A phase's peak is VmHWM after `reset_peak()` (the kernel's high-water mark, reset to the resident set
of the moment), less VmRSS before it. glibc keeps freed blocks in its arenas, so a later phase would
find memory resident that an earlier one freed: the tools run their measured processes with MALLOC_ENV,
which has every block over 64 KiB mapped on its own and unmapped on free, so that the resident set
follows the tensors. glibc reads it once, at start-up: it must be in the process's environment.
"""

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def proc_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM, …) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak():
    """VmHWM ← VmRSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
