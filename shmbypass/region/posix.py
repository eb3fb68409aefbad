"""The ``posix`` region backend: a POSIX shared-memory segment
``/<instance>-region`` (posix_ipc): a VM pair's region tested on one host.
Its file mode and owner decide who may map it (0600 by default)."""
import errno
import mmap
import os

import posix_ipc

from shmbypass import paths
from shmbypass.region.core import (HDR_SIZE, Region, RegionCorrupt, RegionError, RegionExists,
                                   RegionNotFound, region_size)


def segment_name(instance):
    """The region's segment of an instance (None: the current one)."""
    return f"/{instance or paths.default_instance()}-region"


def create_segment(name, size, mode, uid=None, gid=None):
    """A new segment of size bytes, mapped; RegionExists if it is there."""
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
    except posix_ipc.ExistentialError:
        raise RegionExists(errno.EEXIST, f"shm segment {name} already exists") from None
    try:
        os.fchmod(shm.fd, mode)  # shm_open applied our umask
        if uid is not None or gid is not None:
            os.fchown(shm.fd, -1 if uid is None else uid, -1 if gid is None else gid)
        mm = mmap.mmap(shm.fd, size)
    except BaseException:
        shm.close_fd()
        shm.unlink()
        raise
    shm.close_fd()
    return mm


def open_segment(name):
    """An existing segment, mapped whole."""
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        raise RegionNotFound(errno.ENOENT, f"no shm segment {name}") from None
    except posix_ipc.PermissionsError as e:
        raise RegionError(errno.EACCES, f"shm segment {name}: {e}") from None
    try:
        size = os.fstat(shm.fd).st_size
        if size < HDR_SIZE:
            raise RegionCorrupt(errno.EPROTO, f"shm segment {name} is {size} bytes: no region header")
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()


def unlink_segment(name):
    """Remove a segment; False if there was none."""
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


class PosixRegion(Region):
    """A region in a POSIX shm segment; destroy() unlinks it."""

    @classmethod
    def format(cls, *, instance=None, slot_count, slot_size, mode=0o600, uid=None, gid=None,
               region_id=None):
        size = region_size(slot_count, slot_size)
        name = segment_name(instance)
        self = cls("posix", size, name)
        self.adopt_mmap(create_segment(name, size, mode, uid, gid))
        try:
            self.format_header(slot_size, region_id)
        except BaseException:
            self.destroy()
            raise
        return self

    @classmethod
    def open(cls, *, instance=None):
        name = segment_name(instance)
        mm = open_segment(name)
        self = cls("posix", len(mm), name)
        self.adopt_mmap(mm)
        try:
            self.check()
        except BaseException:
            self.close()
            raise
        return self

    def destroy(self):
        self.close()
        if self.name:
            unlink_segment(self.name)
