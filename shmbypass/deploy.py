"""Install the systemd units of deploy/systemd: `shmbypass install-service`.

The units in the source tree run /usr/local/bin/shmbypass; the installed
copies run the shmbypass that installs them (this venv's), so `make setup`
followed by `install-service` is all a host needs. Nothing is enabled or
started here: the command prints what to run (docs/DEPLOY.md).
"""
import os
import subprocess
import sys

from shmbypass import paths
from shmbypass.errors import ShmbypassError

UNITS = ("shmbypass.service", "shmbypass-metrics.service")
UNIT_DIR = "/etc/systemd/system"
TEMPLATE_DIR = os.path.join(os.path.dirname(paths.PKG_DIR), "deploy", "systemd")
TEMPLATE_EXE = "/usr/local/bin/shmbypass"


def shmbypass_command() -> str:
    """How a unit runs this shmbypass: the console script beside this
    Python (a venv's bin/), else this Python with -m."""
    script = os.path.join(os.path.dirname(sys.executable), "shmbypass")
    if os.access(script, os.X_OK):
        return script
    return f"{sys.executable} -m shmbypass"


def render(name: str, command: str | None = None) -> str:
    path = os.path.join(TEMPLATE_DIR, name)
    if not os.path.exists(path):
        raise ShmbypassError(f"{path} is missing: install-service works from the source tree "
                             "(the units live in deploy/systemd)")
    with open(path) as f:
        text = f.read()
    return text.replace(TEMPLATE_EXE, command or shmbypass_command())


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")  # what sd_booted() checks


def install(unit_dir: str = UNIT_DIR, command: str | None = None) -> list[str]:
    """Write the units into unit_dir; the paths written."""
    os.makedirs(unit_dir, exist_ok=True)
    out = []
    for name in UNITS:
        dst = os.path.join(unit_dir, name)
        tmp = dst + ".tmp"
        with open(tmp, "w") as f:
            f.write(render(name, command))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
        out.append(dst)
    return out


def remove(unit_dir: str = UNIT_DIR) -> list[str]:
    gone = []
    for name in UNITS:
        try:
            os.unlink(os.path.join(unit_dir, name))
            gone.append(os.path.join(unit_dir, name))
        except FileNotFoundError:
            pass
    return gone


def cmd_install_service(args) -> int:
    unit_dir = args.unit_dir or UNIT_DIR
    done = remove(unit_dir) if args.remove else install(unit_dir)
    for p in done:
        print(f"shmbypass: {'removed' if args.remove else 'wrote'} {p}")
    reload_ = unit_dir == UNIT_DIR and systemd_running()
    if reload_:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    if args.remove:
        return 0
    print("shmbypass: now " + ("" if reload_ else "systemctl daemon-reload && ")
          + "systemctl enable --now shmbypass.service  (and shmbypass-metrics.service for the "
          "exporter; options in /etc/default/shmbypass, see docs/DEPLOY.md)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("install-service", help="install the systemd units (up at boot, down at "
                                               "stop; the metrics exporter)")
    p.add_argument("--unit-dir", metavar="DIR", help=f"where to write them (default {UNIT_DIR})")
    p.add_argument("--remove", action="store_true", help="remove the installed units instead")
    p.set_defaults(func=cmd_install_service)
