"""vfork() + execve("/bin/true") from C while a connection is open
(c/cf-spawn.c); the child closes nothing."""
from scenarios.subprocess_run import server  # noqa: F401  (the same server)

CLIENT = ["cf-spawn", "vfork"]
