"""Issue 10 case 2 from C: posix_spawn() with a file action that closes
fds >= 3 in the child (posix_spawn_file_actions_addclosefrom_np, glibc's
close_range in the vfork-like child) while a connection is open
(c/cf-spawn.c): the connection must go on."""
from scenarios.subprocess_run import server  # noqa: F401  (the same server)

CLIENT = ["cf-spawn", "posix_spawn_closefrom"]
