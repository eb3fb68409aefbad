"""The shmbypass command line: up, down, run, status, doctor, capture, bench, vm,
metrics, install-service."""
import argparse
import json
import os
import sys

from shmbypass import __version__, deploy, doctor, manager, metrics, paths, policy, programs, status
from shmbypass.bench import cli as bench_cli
from shmbypass.capture import cli as capture_cli
from shmbypass.errors import ShmbypassError
from shmbypass.vm import cli as vm_cli


def cmd_up(args) -> int:
    if args.without:
        os.environ[programs.WITHOUT_ENV] = args.without
    inst = paths.Instance.current()
    allow = policy.Policy(
        any_user=args.allow_any_user, users=[policy.uid_of(u) for u in args.allow_user],
        groups=[policy.gid_of(g) for g in args.allow_group],
        exclude_ports=[policy.port_of(p) for p in args.exclude_port],
        include_ports=[policy.port_of(p) for p in args.include_port],
        exclude_nets=[policy.checked_net(n) for n in args.exclude_net],
        include_nets=[policy.checked_net(n) for n in args.include_net],
        memory_max=policy.size_of(args.memory_max) if args.memory_max else 0)
    if manager.up(inst, cgroup=args.cgroup, slot_count=args.slots, backend=args.backend,
                  part=args.part, allow=allow, vm_peers=tuple(args.vm_peer)):
        state = inst.load_state()
        region = state.get("region") or {}
        if region.get("note"):
            print(f"shmbypass: {region['note']}", file=sys.stderr)
        vm = (f", VM-pair region {region.get('backend')}:{region.get('path')} "
              f"x{region.get('slot_count')}" if region else "")
        print(f"shmbypass: up (instance {inst.name}, cgroup {inst.cgroup}, pins {inst.pin_dir}{vm})")
        for line in policy.describe(policy.Policy.from_dict(state.get("policy"))):
            print(f"shmbypass: {line}")
        for name, f in state.get("features", {}).items():
            if not f["ok"]:
                print(f"shmbypass: optional feature off: {name}: {f['detail']}", file=sys.stderr)
    else:
        print(f"shmbypass: already up (instance {inst.name})")
    return 0


def cmd_down(args) -> int:
    inst = paths.Instance.current()
    how = manager.down(inst, drain_timeout=args.drain_timeout, force=args.force)
    if how is not None:
        print(f"shmbypass: down (instance {inst.name}): {how}; live connections continue over TCP")
    else:
        print(f"shmbypass: nothing to take down (instance {inst.name})")
    return 0


def cmd_run(args) -> int:
    argv = args.command
    if argv and argv[0] == "--":
        argv = argv[1:]
    return manager.run(paths.Instance.current(), argv, tier=args.tier)


def cmd_status(args) -> int:
    inst = paths.Instance.current()

    def show() -> str:
        st = status.select(status.status(inst), tier=args.tier, port=args.port, pid=args.pid)
        if args.json:  # under --watch: one object per line
            return status.to_json(st) if args.watch is None else json.dumps(st)
        return status.render(st)

    if args.watch is None:
        print(show())
        return 0
    import time
    while True:  # ^C ends it (main() turns it into exit status 130)
        out = show()
        if not args.json and sys.stdout.isatty():
            out = "\033[H\033[2J" + time.strftime("%H:%M:%S  ") + out  # redraw in place
        print(out, flush=True)
        time.sleep(args.watch)


def cmd_doctor(args) -> int:
    lines = doctor.check()
    for ln in lines:
        print(ln.render())
    return 0 if all(ln.ok or not ln.required for ln in lines) else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shmbypass", description=(
        "Transparent shared-memory / kernel bypass for local TCP connections. "
        "The instance is chosen with SHMBYPASS_INSTANCE (default: shmbypass)."))
    ap.add_argument("--version", action="version", version=__version__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("up", help="load, pin and attach the bypass")
    p.add_argument("--cgroup", help="cgroup v2 directory to attach to (default: <cgroup2>/<instance>)")
    p.add_argument("--backend", choices=["posix", "ivshmem"],
                   help="a VM pair's shared region: ivshmem (in a guest: the region the host "
                        "formatted) or posix (the VM path on one host, for tests); one-host "
                        "connections need none")
    p.add_argument("--vm-peer", action="append", default=[], metavar="ADDR",
                   help="the peer VM's address: toward it (only) sockets carry the TCP option "
                        "that negotiates region slots (repeat; with --backend ivshmem the default "
                        "is $SHMBYPASS_VM_PEER, which the VM pair sets to the other guest's)")
    p.add_argument("--part", type=int, metavar="N",
                   help="ivshmem: allocate from part N of the region (default: the part of "
                        "$SHMBYPASS_GUEST)")
    p.add_argument("--slots", type=int, metavar="N",
                   help="a VM pair's ring slots in the pool (--vm-peer, --backend ivshmem), two "
                        "per connection (default 128); one-host connections need none")
    p.add_argument("--without", metavar="FEATURE[,FEATURE]",
                   help="optional features not to use, as if the kernel refused them "
                        "(drain, drain-tcp, ask, capture; also SHMBYPASS_WITHOUT)")
    p.add_argument("--allow-user", action="append", default=[], metavar="USER",
                   help="this user may use the shm tier (repeat; root always may)")
    p.add_argument("--allow-group", action="append", default=[], metavar="GROUP",
                   help="members of this group (as primary group) may use the shm tier")
    p.add_argument("--allow-any-user", action="store_true",
                   help="every user in the bypass group may use the shm tier")
    p.add_argument("--exclude-port", action="append", default=[], metavar="PORT",
                   help="connections to this server port stay on TCP (repeat)")
    p.add_argument("--include-port", action="append", default=[], metavar="PORT",
                   help="bypass only connections to these server ports (repeat)")
    p.add_argument("--exclude-net", action="append", default=[], metavar="ADDR[/LEN]",
                   help="connections to these server addresses stay on TCP (repeat)")
    p.add_argument("--include-net", action="append", default=[], metavar="ADDR[/LEN]",
                   help="bypass only connections to these server addresses (repeat)")
    p.add_argument("--memory-max", metavar="SIZE",
                   help="ring memory one process's shm-tier connections may hold (e.g. 2G); "
                        "past it new connections stay on TCP (reason memory-cap). Default: "
                        "no cap")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="detach and unpin everything; live connections go on over TCP")
    p.add_argument("--drain-timeout", type=float, default=10.0,
                   help="seconds to wait for redirected data to be read (default 10)")
    p.add_argument("--force", action="store_true", help="drop unread redirected data after the timeout")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("run", help="run a command inside the bypass group")
    p.add_argument("--tier", choices=["kernel", "shm"], default="shm",
                   help="shm (default): preload the interposer, so connections whose peer "
                        "runs it too use the rings, others the kernel tier or TCP; "
                        "kernel: no interposer, sk_msg redirect only")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="what is attached, and the tier of each connection")
    p.add_argument("--json", action="store_true",
                   help="machine-readable (reason codes: docs/REASONS.md)")
    p.add_argument("--tier", choices=["tcp", "kernel", "shm"], help="only connections in this tier")
    p.add_argument("--port", type=int, help="only connections with this local or remote port")
    p.add_argument("--pid", type=int, help="only sockets this process holds")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, metavar="SECONDS",
                   help="show it again every SECONDS (default 1) until ^C")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("doctor", help="check what this kernel and system support")
    p.set_defaults(func=cmd_doctor)

    # Subcommands that live in their own modules and packages.
    capture_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    vm_cli.add_parser(sub)
    metrics.add_parser(sub)
    deploy.add_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths.default_instance()  # every command refuses a bad SHMBYPASS_INSTANCE first
        return args.func(args)
    except ShmbypassError as e:
        print(f"shmbypass: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # One line, never a traceback: say what failed and why.
        print(f"shmbypass: error: {e.strerror or e}"
              + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
