"""Keep freed memory in the process: a glibc malloc setting for `ropo`'s own processes.

A CPU training step frees and allocates the same large tensors every step: at SmolLM2-135M's
shape the logits and their log-softmax (200 MB each), the LM head's and the embedding's gradients
(113 MB each). glibc's malloc serves every block over 32 MB with a fresh mmap and unmaps it on
free, so the kernel hands out and zeroes those pages again at every step: about 200,000 page
faults per step there. With mmap off and the heap never trimmed, a freed block goes back to
malloc's free lists and later steps reuse it: after three or four steps, none to 30,000 faults.
On the 2-core benchmark machine (a virtual machine, where faults cost more) that took the step
from 11.2-11.6 to 9.4-10.0 s, medians of steps 3-6 in two pairs of runs (docs/performance.md).

The price: the process keeps its peak memory until it exits instead of returning freed blocks
to the system, and free blocks split by live ones raise that peak a little (+50 to +140 MB, 1-3%,
at that shape). A training run holds its peak for its whole life anyway, which is why the `ropo`
command turns this on (cli.run) and importing ropo does not.

ROPO_KEEP_FREED_MEMORY=0 leaves malloc as it is, and so does a GLIBC_TUNABLES that sets any
malloc tunable (the user's choice wins). Outside glibc (macOS, musl) there is nothing to set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt's parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1  # free memory at the heap's top beyond this many bytes goes back to the OS
M_MMAP_MAX = -4  # how many blocks may be mmapped at once; 0: none, every block from the heap

NEVER = -1  # as M_TRIM_THRESHOLD: never trim (mallopt(3))


def keep_freed_memory() -> str | None:
    """Make glibc's malloc serve every block from its heap and never trim that heap.

    Returns None when set, otherwise why not (a line for logs; nothing changed). Call it once,
    early, in a process that trains: it changes malloc for the whole process.
    """
    if os.environ.get("ROPO_KEEP_FREED_MEMORY", "1") == "0":
        return "ROPO_KEEP_FREED_MEMORY=0"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc already"
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return "no C library found"
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return f"{libc_name} is not glibc"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER) != 1:
        return "mallopt refused the setting"
    return None
