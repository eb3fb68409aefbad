"""shmbypass.memword: one aligned store per word, inside the mapping."""
import mmap
import struct

import pytest

from shmbypass import memword


def test_stores_land_where_asked_and_nowhere_else():
    with mmap.mmap(-1, 4096) as mm:
        mm[:] = b"\xAA" * 4096
        memword.store_u64(mm, 24, 0x0102030405060708)
        memword.store_u32(mm, 8, 7)
        assert struct.unpack_from("<Q", mm, 24)[0] == 0x0102030405060708
        assert struct.unpack_from("<I", mm, 8)[0] == 7
        assert mm[:8] == b"\xAA" * 8 and mm[12:24] == b"\xAA" * 12 and mm[32:] == b"\xAA" * 4064


@pytest.mark.parametrize("off,size", [(4, 8), (4090, 8), (-8, 8), (4096, 4), (2, 4)])
def test_a_word_outside_or_misaligned_is_refused(off, size):
    with mmap.mmap(-1, 4096) as mm:
        store = memword.store_u64 if size == 8 else memword.store_u32
        with pytest.raises(ValueError):
            store(mm, off, 1)
