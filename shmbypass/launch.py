#!/usr/bin/env python3
"""Start a program inside a bypass instance that an administrator brought
up: the `shmbypass run` of a non-root user.

Standard library only: `up` copies this file to /run/<instance>/bin/
shmbypass-run, so that users who cannot reach the project's own Python
environment can run it too:

    /run/shmbypass/bin/shmbypass-run [--tier shm|kernel] -- CMD ARGS...

It asks the instance's join broker (shmbypass/broker.py) to put this
process into the bypass group (the broker checks the caller's identity
against the policy), then executes CMD with the instance's preload
libraries (copied by `up` to /run/<instance>/lib, readable by everyone).
"""
import os
import socket
import sys

RUN_ROOT = "/run"
LIBS = {"shm": ("libshmbypass-preload.so", "libshmbypass-guard.so"),
        "kernel": ("libshmbypass-guard.so",)}


def join(instance: str) -> None:
    """Enter the bypass group through the broker; SystemExit with its reason."""
    path = os.path.join(RUN_ROOT, instance, "broker.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(b"join\n")
            answer = s.makefile().readline().strip()
    except socket.timeout:
        raise SystemExit(f"shmbypass: error: the join broker of instance {instance} did not "
                         f"answer ({path})") from None
    except OSError as e:
        raise SystemExit(f"shmbypass: error: instance {instance} takes no non-root programs "
                         f"({path}: {e.strerror}); an administrator runs `shmbypass up "
                         f"--allow-user USER` first") from None
    if answer != "ok":
        raise SystemExit("shmbypass: error: " + answer.removeprefix("denied ").strip())


def environment(instance: str, tier: str) -> dict:
    libdir = os.path.join(RUN_ROOT, instance, "lib")
    env = dict(os.environ, SHMBYPASS_INSTANCE=instance)
    own = [os.path.join(libdir, name) for name in LIBS[tier]]
    if tier == "shm" and os.environ.get("SHMBYPASS_PRELOAD"):
        own[0] = os.environ["SHMBYPASS_PRELOAD"]
    before = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p not in own]
    env["LD_PRELOAD"] = " ".join(before + own)
    return env


def main(argv: list[str]) -> int:
    tier = "shm"
    if argv[:1] == ["--tier"] and len(argv) > 1:
        tier, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or tier not in LIBS:
        raise SystemExit("usage: shmbypass-run [--tier shm|kernel] -- CMD ARGS...")
    instance = os.environ.get("SHMBYPASS_INSTANCE", "shmbypass")
    if not instance or "/" in instance or instance.startswith("."):
        raise SystemExit(f"shmbypass: error: bad instance name {instance!r}")
    join(instance)
    try:
        os.execvpe(argv[0], argv, environment(instance, tier))
    except FileNotFoundError:
        raise SystemExit(f"shmbypass: error: run: command not found: {argv[0]}") from None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
