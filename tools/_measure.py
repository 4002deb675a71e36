"""What the memory benchmarks in tools/ share: this process's resident memory, as Linux's /proc reports it.

A phase's peak is VmHWM after `reset_peak()` (the kernel's high-water mark, reset to the resident set
of the moment), less VmRSS before it. glibc keeps freed blocks in its arenas, so a later phase would
find memory resident that an earlier one freed: the tools run their measured processes with MALLOC_ENV,
which has every block over 64 KiB mapped on its own and unmapped on free, so that the resident set
follows the tensors. glibc reads it once, at start-up: it must be in the process's environment.
"""

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


from minirl.train import proc_bytes, reset_peak_rss as reset_peak  # noqa: E402,F401  (one /proc reader)
