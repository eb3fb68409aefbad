"""The ``anon`` region backend: an anonymous MAP_SHARED mapping, shared with
the processes this one forks later (tests and the raw ring benchmark)."""
import mmap

from shmbypass.region.core import SLOT_SIZE_DEFAULT, Region, region_size


def anonymous(slot_count=4, slot_size=SLOT_SIZE_DEFAULT, region_id=None):
    """A formatted anonymous region of slot_count slots."""
    size = region_size(slot_count, slot_size)
    reg = Region("anon", size)
    reg.adopt_mmap(mmap.mmap(-1, size, flags=mmap.MAP_SHARED))
    reg.format_header(slot_size, region_id)
    return reg
