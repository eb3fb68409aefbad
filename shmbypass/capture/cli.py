"""`shmbypass capture [-w FILE] [-c COUNT] [--duration S] [FILTER]`."""
import sys

from shmbypass import paths
from shmbypass.capture.session import DEFAULT_BUFFER_KIB, run, summary


def add_parser(sub) -> None:
    p = sub.add_parser("capture", help="write a pcap of the bytes bypassed connections carry")
    p.add_argument("-w", dest="file", default="-", metavar="FILE",
                   help="write to FILE (default: stdout, e.g. | tcpdump -r -); "
                        "pcapng, or classic pcap if FILE ends in .pcap")
    p.add_argument("-c", dest="count", type=int, metavar="COUNT", help="stop after COUNT packets")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--format", choices=["pcapng", "pcap"], help="file format (default by name)")
    p.add_argument("-B", "--buffer-size", type=int, default=DEFAULT_BUFFER_KIB, metavar="KIB",
                   help=f"the kernel tier's ring buffer (default {DEFAULT_BUFFER_KIB} KiB)")
    p.add_argument("filter", nargs="*", metavar="FILTER",
                   help="host ADDR, port N, tier kernel|shm (all must hold)")
    p.set_defaults(func=cmd_capture)


def cmd_capture(args) -> int:
    inst = paths.Instance.current()
    where = "stdout" if args.file == "-" else args.file

    def ready():
        print(f"shmbypass: capturing bypassed connections of instance {inst.name} to {where} "
              "(^C to stop)", file=sys.stderr, flush=True)

    stats = run(inst, args.file, args.format, args.count, args.duration, args.filter,
                args.buffer_size, ready)
    print(f"shmbypass: {summary(stats, args.file)}", file=sys.stderr)
    return 0
