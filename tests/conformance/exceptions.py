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


def _limit(reason):
    return Known("limit", "-", reason)


KNOWN: dict[tuple[str, str], Known] = {
    ("busybox_inherit", "kernel"): _limit(
        "a static program (busybox) that moves the bytes with sendfile() into a pipe sees none "
        "of the redirected bytes (tcp_bpf has no splice_read) and exits 0 with 0 of 1 MiB; the "
        "guard covers dynamic programs, nothing reaches a static one"),
    ("msg_oob", "kernel"): _limit(
        "an urgent byte is redirected as plain data (sk_msg carries no urgent pointer): "
        "recv(MSG_OOB) returns the first byte of the stream, the urgent byte stays in the "
        "stream, poll shows no PRI"),
    ("rcvlowat", "kernel"): _limit(
        "SO_RCVLOWAT ignored: poll/epoll say readable and recv() returns at 50 of 100 bytes "
        "(tcp_bpf's readiness and recvmsg look at the redirect queue, not the low-water mark)"),
    ("rcvlowat_before_connect", "kernel"): _limit(
        "SO_RCVLOWAT ignored, as in rcvlowat: poll says readable and recv() returns at 50 of "
        "100 bytes"),
    ("kill9_reader", "kernel"): _limit(
        "a reader killed with unread redirected bytes closes with FIN, not RST (tcp_close() "
        "counts only the receive queue as unread): the writer gets EPIPE, TCP gives ECONNRESET"),
    ("nonblocking_fill", "kernel"): _limit(
        "sk_msg redirect charges the peer's queue only against tcp_mem, never its "
        "receive buffer: a writer whose peer does not read never gets EAGAIN "
        "(docs/ARCHITECTURE.md; needs a kernel change)"),
    ("timeouts_nonblock", "kernel"): _limit(
        "the same: SO_SNDTIMEO never expires while the peer does not read"),
    ("msg_oob", "shm"): _limit(
        "MSG_OOB is refused (send: ENOTSUP, recv: EINVAL): a ring has no urgent "
        "pointer (docs/ARCHITECTURE.md, the interposer's known limits)"),
}
