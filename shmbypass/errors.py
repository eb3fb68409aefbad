"""The one place where failures become exceptions with a one-line message."""
import errno
import os


class ShmbypassError(Exception):
    """A failure the user can act on; str() is the one-line message."""


class NotRoot(ShmbypassError):
    pass


class FeatureMissing(ShmbypassError):
    """The kernel or the system lacks something shmbypass needs."""


class VMError(ShmbypassError):
    """A failure of the VM pair (shmbypass.vm); str() is a one-line message."""


class GuestDied(VMError):
    """A guest of the VM pair is gone (its QEMU exited or was killed)."""


def oserror(err: int, what: str) -> OSError:
    """An OSError for a negative or positive errno, naming what failed."""
    err = abs(err)
    return OSError(err, f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")
