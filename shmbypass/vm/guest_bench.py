"""The client side of `vm bench`, run in guest A:

    python -m shmbypass.vm.guest_bench ADDR SECONDS REPS [WRAPPER...]

drives one sbp-pingpong client (under WRAPPER, e.g. `shmbypass run --tier
shm --`) over its stdin, looks at the connection's tier after the first
exchange, and prints one JSON line per result: {"tiers": [...]} first, then
sbp-pingpong's own line for each figure of each repetition (with "rep")."""
import json
import subprocess
import sys
import time

from shmbypass import paths, status

TESTS = (("rtt", 64), ("rtt", 16384), ("stream", 65536))


def connect(wrap, addr):
    """A client that answered its first exchange (the server may still be starting)."""
    for _ in range(300):
        c = subprocess.Popen(wrap + [paths.tool("sbp-pingpong"), "client", addr, "--stdin"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        c.stdin.write("rtt 64 0.2 10\n")
        c.stdin.flush()
        if c.stdout.readline():
            return c
        c.wait()
        time.sleep(0.2)
    sys.exit("no connection to " + addr)


def tiers_of(port):
    """tier[:reason] of this instance's connections to port."""
    try:
        return [r["tier"] + (":" + r["reason"] if r["reason"] else "")
                for r in status.connections(paths.Instance.current())
                if r["remote"].endswith(":" + port)]
    except Exception as e:  # noqa: BLE001 - not up: plain TCP, and the line says why
        return [f"status: {e}"]


def main(argv):
    addr, seconds, reps, wrap = argv[0], float(argv[1]), int(argv[2]), argv[3:]
    c = connect(wrap, addr)
    print(json.dumps({"tiers": tiers_of(addr.rsplit(":", 1)[1])}), flush=True)
    for rep in range(reps):
        for kind, size in TESTS:
            c.stdin.write(f"{kind} {size} {seconds}\n")
            c.stdin.flush()
            line = c.stdout.readline()
            if not line:
                sys.exit("client ended early")
            r = json.loads(line)
            r["rep"] = rep
            print(json.dumps(r), flush=True)
    c.stdin.write("quit\n")
    c.stdin.close()
    c.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
