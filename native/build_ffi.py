"""cffi (API mode) builder for shmbypass._native.

One extension module holds the C the Python side calls: the libbpf binding
(libbpf.cdef, libbpf_shim.c), the shared-memory ring (ring.cdef, ring.c,
ring_wait.c) and the region (region.cdef, region.c).
Declarations live in the .cdef files; `...` lets the compiler fill in
constants and struct layouts.
"""
import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ["libbpf", "bypass", "capture", "ring", "region", "pairmem", "stream", "inbox", "words"]  # each: <part>.cdef, optional <part>.h, <part>.c, <part>_*.c
BPF_DIR = os.path.join(HERE, "..", "bpf")  # bypass.h lives with the BPF programs

CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-Wno-unused-function"]


def reason_cdef():
    """enum sbp_reason's constants, from the one table of reasons (bpf/bypass.h,
    SBP_REASONS), so that no list of them is written twice."""
    with open(os.path.join(BPF_DIR, "bypass.h")) as f:
        names = re.findall(r"X\((SBP_REASON_\w+),", f.read())
    return "".join(f"#define {n} ...\n" for n in names + ["SBP_REASON__MAX"])


ffibuilder = FFI()
ffibuilder.cdef(reason_cdef())
sources, includes = [], []
for part in PARTS:
    cdef = os.path.join(HERE, part + ".cdef")
    if not os.path.exists(cdef):
        continue
    with open(cdef) as f:
        ffibuilder.cdef(f.read())
    if any(os.path.exists(os.path.join(d, part + ".h")) for d in (HERE, BPF_DIR)):
        includes.append(f'#include "{part}.h"')
    found = [os.path.join(HERE, part + ".c")] + sorted(glob.glob(os.path.join(HERE, part + "_*.c")))
    sources += [os.path.relpath(p) for p in found if os.path.exists(p)]

ffibuilder.set_source(
    "shmbypass._native",
    "\n".join(["#include <bpf/libbpf.h>", "#include <bpf/bpf.h>"] + includes),
    sources=sources,
    include_dirs=[HERE, BPF_DIR],
    # a changed header (a struct, the reason table) rebuilds the module too
    depends=[os.path.relpath(p) for d in (HERE, BPF_DIR) for p in sorted(glob.glob(os.path.join(d, "*.h")))],
    libraries=["bpf"],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
