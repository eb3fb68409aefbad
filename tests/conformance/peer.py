"""Run one end of a conformance scenario.

    python peer.py SCENARIO server          prints "PORT <n>", then serves
    python peer.py SCENARIO client PORT
    python peer.py SCENARIO ROLE ARGS...    another program of the scenario
                                            (e.g. a process it passes a socket to)

SCENARIO names tests/conformance/scenarios/SCENARIO.py, which defines
`server(srv)` and `client(cli)` (runtime.Server, runtime.Client). An
exception that escapes them is an observation too ("exception": its errno
name or type) and makes the exit status 1.
"""
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]        # runtime, scenarios; tests/ (sockets.py)

import runtime  # noqa: E402


def main():
    name, role = sys.argv[1], sys.argv[2]
    mod = importlib.import_module(f"scenarios.{name}")
    try:
        if role == "server":
            mod.server(runtime.Server())
        elif role == "client":
            mod.client(runtime.Client(int(sys.argv[3])))
        else:
            getattr(mod, role)(sys.argv[3:])
    except Exception as e:
        runtime.obs("exception", runtime.err_name(e))
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)    # no waiting for threads a scenario left blocked on purpose


if __name__ == "__main__":
    main()
