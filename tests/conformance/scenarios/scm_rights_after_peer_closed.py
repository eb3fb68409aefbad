"""Issue 10 case 4, the peer gone first: the server sends 60 kB and exits;
only then does the client pass the socket over SCM_RIGHTS to a process
without the interposer. The receiver reads exactly the 60 kB, then EOF."""
from scenarios.exec_after_peer_closed import server, wait_peer_closed  # noqa: F401
from scenarios.scm_rights_unpreloaded import give_away, receiver  # noqa: F401


def client(cli):
    give_away(cli, __name__, before=wait_peer_closed)
