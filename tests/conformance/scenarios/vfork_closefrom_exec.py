"""Issue 10 case 2 from C: vfork(), close_range(3, ~0) in the child (it
shares the parent's memory), execve("/bin/true"), as CPython's subprocess
does, while a connection is open (c/cf-spawn.c): the connection must go on."""
from scenarios.subprocess_run import server  # noqa: F401  (the same server)

CLIENT = ["cf-spawn", "vfork_closefrom"]
