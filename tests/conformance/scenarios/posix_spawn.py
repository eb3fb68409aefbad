"""glibc's posix_spawn() of /bin/true from C while a connection is open
(c/cf-spawn.c); the child inherits the fds and closes none."""
from scenarios.subprocess_run import server  # noqa: F401  (the same server)

CLIENT = ["cf-spawn", "posix_spawn"]
