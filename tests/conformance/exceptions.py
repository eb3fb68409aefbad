"""The only differences from loopback TCP that may stand, each with its
reason (docs/CONFORMANCE.md lists them too; a test keeps the two in step).

    xfail   a known bug, not fixed yet: the test is marked
            xfail(strict=True), so CI stays green now and turns red the day
            the case passes (then delete the entry, and its row in the doc)
    limit   a documented limit of a tier (a kernel change would be needed):
            the difference is accepted, and the test fails if it goes away

`case` is issue 10's case number ("10.3"), or "new" for a difference this
suite found that the issue does not name.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Known:
    kind: str       # "xfail" | "limit"
    case: str
    reason: str


def _xfail(case, reason):
    return Known("xfail", case, reason)


KNOWN: dict[tuple[str, str], Known] = {
    ("busybox_inherit", "kernel"): _xfail(
        "10.5", "busybox moves the bytes with sendfile() into a pipe (a splice): it does not "
        "see the redirected bytes and exits 0 with 0 of 1 MiB"),
    ("splice_out_peer_closed", "kernel"): _xfail(
        "10.5", "splice() out of a socket does not see the redirected bytes: 0 bytes, then EOF"),
    ("splice_out_peer_open", "kernel"): _xfail(
        "10.5", "splice() out of a socket does not see the redirected bytes: it blocks"),
    ("send_after_shutdown", "kernel"): _xfail(
        "new", "a send() after our own shutdown(SHUT_WR) succeeds and the peer reads "
        "its bytes after our FIN; TCP fails it with EPIPE"),
    ("msg_oob", "kernel"): _xfail(
        "new", "an urgent byte is redirected as plain data: recv(MSG_OOB) returns the first "
        "byte of the stream, the urgent byte stays in the stream, poll shows no PRI"),
    ("rcvlowat", "kernel"): _xfail(
        "10.7", "SO_RCVLOWAT ignored: readable and recv() return at 50 of 100 bytes"),
    ("peek_waitall", "kernel"): _xfail(
        "10.7", "MSG_PEEK|MSG_WAITALL returns the 40 bytes queued at once"),
    ("kill9_reader", "kernel"): _xfail(
        "10.7", "a reader killed with unread redirected bytes closes with FIN, not RST: the "
        "writer gets EPIPE, TCP gives ECONNRESET"),
    ("nonblocking_fill", "kernel"): Known(
        "limit", "-", "sk_msg redirect charges the peer's queue only against tcp_mem, never its "
        "receive buffer: a writer whose peer does not read never gets EAGAIN "
        "(docs/ARCHITECTURE.md; needs a kernel change)"),
    ("timeouts_nonblock", "kernel"): Known(
        "limit", "-", "the same: SO_SNDTIMEO never expires while the peer does not read"),
    ("msg_oob", "shm"): Known(
        "limit", "-", "MSG_OOB is refused (send: ENOTSUP, recv: EINVAL): a ring has no urgent "
        "pointer (docs/ARCHITECTURE.md, the interposer's known limits)"),
}
