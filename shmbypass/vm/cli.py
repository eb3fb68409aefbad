"""`shmbypass vm ...` and `python -m shmbypass.vm ...`: status, format,
build, launch and bench of the IVSHMEM VM pair."""
import argparse
import json
import os
import sys

from shmbypass.errors import VMError
from shmbypass.vm import bench, image, status
from shmbypass.vm.pair import GUESTS, VMPair


def _cmd_status(args):
    try:
        rep = status.bar_status() if args.region == "ivshmem" else status.region_status(args.region)
    except OSError as e:
        print(f"shmbypass vm status: {args.region}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(json.dumps(rep, indent=1) if args.json else status.render_status(rep))
    return 0 if rep["state"] in ("ok", "empty") else 2


def _cmd_format(args):
    rep = status.format_region_file(args.region, guests=tuple(g.strip() for g in args.guests.split(",")),
                             region_id=args.region_id)
    print(status.render_status(rep))
    return 0


def _cmd_bench(args):
    if args.spin_ns is not None:
        os.environ["SHMBYPASS_SPIN_NS"] = str(args.spin_ns)
    rep = bench.bench_pair(seconds=args.seconds, reps=args.reps,
                     log=lambda m: print(f"vm bench: {m}", file=sys.stderr))
    print(bench.render_bench(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    if args.out:
        for kind, path in bench.write_bench_outputs(rep, args.out).items():
            print(f"vm bench: {kind}: {path}", file=sys.stderr)
    engaged = rep["transports"].get("shm", {}).get("engaged")
    return 0 if engaged else 1


def _cmd_build(args):
    img = image.build_image(force=args.force, log=lambda m: print(f"vm build: {m}", file=sys.stderr))
    print(f"kernel {img.kernel}\ninitrd {img.initrd}\npackage {img.package} {img.version}")
    return 0


def _cmd_launch(args):
    def log(m):
        print(f"vm: {m}", file=sys.stderr)
    init = os.urandom(args.garbage) if args.garbage else None
    ivs = tuple(args.ivshmem.split(",")) if args.ivshmem else ("A", "B")
    with VMPair(region_size=args.region_mb << 20, region_init=init, ivshmem=ivs,
                accel=args.accel, log=log, region_format=not args.no_format) as pair:
        log(f"pair up in {pair.boot_seconds:.1f}s ({pair.accel_used}); region {pair.region_path}"
            + (f" (id {pair.region_id:016x}, part 0 = A, part 1 = B)" if pair.region_id else ""))
        rc = 0
        for spec in args.exec or []:
            guest, _, cmd = spec.partition(":")
            res = pair.run(guest.strip(), cmd, timeout=args.timeout)
            sys.stdout.write(res.out)
            sys.stderr.write(res.err)
            log(f"{guest}: exit {res.rc}{' (timed out)' if res.timed_out else ''}")
            rc = rc or res.rc
        if args.exec:
            return rc
        log("type 'A: cmd' or 'B: cmd' (Ctrl-D tears the pair down)")
        for line in sys.stdin:
            guest, sep, cmd = line.partition(":")
            if not sep or guest.strip() not in GUESTS:
                log("format: A: command")
                continue
            try:
                res = pair.run(guest.strip(), cmd.strip(), timeout=args.timeout)
            except VMError as e:
                log(str(e))
                continue
            sys.stdout.write(res.out)
            sys.stderr.write(res.err)
            log(f"exit {res.rc}")
    return 0


def _add_vm_commands(sub):
    p = sub.add_parser("status", help="show a region file's header and live channels (read-only)")
    p.add_argument("region", help="region file, e.g. /dev/shm/sbvm-<pid>-<n>; "
                   "'ivshmem' in a guest: the ivshmem BAR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("build", help="build (or find cached) the guest kernel + initramfs")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("launch", help="boot the two-guest pair, run commands, tear it down")
    p.add_argument("--exec", "-e", action="append", metavar="G:CMD",
                   help="run CMD in guest G (A or B); repeatable; without it, read 'G: CMD' lines from stdin")
    p.add_argument("--timeout", type=float, default=120, help="per command (default 120 s)")
    p.add_argument("--accel", choices=["tcg", "kvm", "auto"], default="tcg")
    p.add_argument("--region-mb", type=int, default=64)
    p.add_argument("--ivshmem", help="guests with the region, e.g. 'A' (default A,B)")
    p.add_argument("--garbage", type=int, metavar="BYTES", help="fill the region's first BYTES with random bytes")
    p.add_argument("--no-format", action="store_true",
                   help="leave the region all zeros (default: a shmbypass region, one part per guest)")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("format", help="format a region file for a pair (before its guests boot)")
    p.add_argument("region", help="the region file (its size stays)")
    p.add_argument("--guests", default="A,B", help="one part per guest, in order (default A,B)")
    p.add_argument("--region-id", type=lambda v: int(v, 16), metavar="HEX", help="default: random")
    p.set_defaults(func=_cmd_format)

    p = sub.add_parser("bench", help="guest-to-guest RTT and throughput: virtual NIC TCP vs the IVSHMEM bypass")
    p.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3; the median counts)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--out", metavar="DIR",
                   help="write DIR/vm-bench.json and DIR/vm-bench.md (the saved run: bench/results)")
    p.add_argument("--spin-ns", type=int, metavar="NS",
                   help="SHMBYPASS_SPIN_NS for the bypassed programs (the interposer's spin budget "
                        "before a doorbell; TCG guests are ~30x slower than the host)")
    p.set_defaults(func=_cmd_bench)


def add_parser(subparsers):
    """Hook for shmbypass.cli: `shmbypass vm status|build|launch`."""
    p = subparsers.add_parser("vm", help="IVSHMEM VM pair: guest image, launcher, region status")
    _add_vm_commands(p.add_subparsers(dest="vm_cmd", required=True))
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m shmbypass.vm",
                                 description="The IVSHMEM VM pair: guest image, launcher, region status")
    _add_vm_commands(ap.add_subparsers(dest="vm_cmd", required=True))
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except VMError as e:
        print(f"shmbypass vm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
