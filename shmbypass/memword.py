"""Stores of one word into memory another process reads at the same time.

struct.pack_into clears the bytes it packs before it writes them, so a
concurrent reader can see 0 for a moment: a capture's lease read as 0 has
expired, a ring tail read as 0 says the ring is full. These stores are
single aligned release stores (native/words.h)."""
import mmap

from shmbypass._native import ffi, lib


def _check(mm: mmap.mmap, off: int, size: int) -> None:
    if off < 0 or off % size or off + size > len(mm):
        raise ValueError(f"a {size}-byte word at {off} of a {len(mm)}-byte mapping")


def store_u64(mm: mmap.mmap, off: int, value: int) -> None:
    _check(mm, off, 8)
    with ffi.from_buffer(mm, require_writable=True) as buf:
        lib.sbp_store_u64(buf + off, value)


def store_u32(mm: mmap.mmap, off: int, value: int) -> None:
    _check(mm, off, 4)
    with ffi.from_buffer(mm, require_writable=True) as buf:
        lib.sbp_store_u32(buf + off, value)
