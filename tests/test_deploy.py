"""deploy/: the systemd units (installed by `shmbypass install-service`,
checked by systemd-analyze, their commands run against a private instance:
no systemd runs here) and the Kubernetes manifests (kubernetes-validate; no
cluster here: docs/DEPLOY.md says what was and was not run)."""
import glob
import os
import shlex
import subprocess

import kubernetes_validate
import pytest
import yaml

from shmbypass import deploy, manager, paths
from shmbypass.capture import control
from apps import SHMBYPASS, need
from conftest import assert_gone, new_instance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "kubernetes")


def install(unit_dir) -> list[str]:
    p = subprocess.run(SHMBYPASS + ["install-service", "--unit-dir", str(unit_dir)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return sorted(glob.glob(os.path.join(unit_dir, "*.service")))


def unit(path) -> dict[str, list[tuple[str, str]]]:
    """[section] -> [(key, value), ...] (keys repeat in unit files)."""
    out, sec = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                sec = out.setdefault(line.strip("[]"), [])
                continue
            k, _, v = line.partition("=")
            sec.append((k, v))
    return out


def value(u, section, key):
    vals = [v for k, v in u[section] if k == key]
    assert len(vals) == 1, (section, key, vals)
    return vals[0]


def test_installed_units_verify(tmp_path):
    need("systemd-analyze")
    units = install(tmp_path)
    assert [os.path.basename(u) for u in units] == sorted(deploy.UNITS)
    main = unit(tmp_path / "shmbypass.service")
    assert value(main, "Service", "Type") == "oneshot"
    assert value(main, "Service", "RemainAfterExit") == "yes"
    exe = value(main, "Service", "ExecStart").split()[0]
    assert os.access(exe, os.X_OK), f"ExecStart runs {exe}, which is not this shmbypass"
    assert value(main, "Service", "ExecStart").split()[1] == "up"
    assert value(main, "Service", "ExecStop").split()[1] == "down"
    assert "/sys/fs/bpf" in value(main, "Unit", "RequiresMountsFor").split()
    # systemd's own parser, with no warning (an unknown key only warns)
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and not p.stderr.strip() and not p.stdout.strip(), p
    # and removed again
    p = subprocess.run(SHMBYPASS + ["install-service", "--unit-dir", str(tmp_path), "--remove"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not glob.glob(str(tmp_path / "*.service")), p


def expand(cmd, env) -> list[str]:
    """A unit's command line as systemd runs it: $VAR splits into words and
    vanishes when unset, ${VAR} is one word."""
    out = []
    for word in shlex.split(cmd):
        if word.startswith("${") and word.endswith("}"):
            out.append(env.get(word[2:-1], ""))
        elif word.startswith("$"):
            out += env.get(word[1:], "").split()
        else:
            out.append(word)
    return out


def test_unit_commands_bring_an_instance_up_and_down(tmp_path):
    """What systemd would run at start and stop, run here against a private
    instance (SHMBYPASS_INSTANCE overridden, as /etc/default/shmbypass can)."""
    install(tmp_path)
    main = unit(tmp_path / "shmbypass.service")
    env = dict(os.environ)
    for k, v in main["Service"]:
        if k == "Environment":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(v)))
    assert env["SHMBYPASS_INSTANCE"] == "shmbypass"
    inst = new_instance("unit")
    env["SHMBYPASS_INSTANCE"] = inst.name
    env["SHMBYPASS_UP_ARGS"] = "--exclude-port 9 --without capture"
    try:
        start = subprocess.run(expand(value(main, "Service", "ExecStart"), env), env=env,
                               capture_output=True, text=True, timeout=120)
        assert start.returncode == 0, start.stderr
        assert manager.is_up(inst)
        state = inst.load_state()  # SHMBYPASS_UP_ARGS reached `up`:
        assert state["policy"]["exclude_ports"] == [9], state
        assert "turned off" in state["features"]["capture"]["detail"], state
        assert "region" not in state  # one host: no region
    finally:
        stop = subprocess.run(expand(value(main, "Service", "ExecStop"), env), env=env,
                              capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert_gone(inst)


# -- Kubernetes ------------------------------------------------------------------

def manifests() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(path) as f:
            out[os.path.basename(path)] = [d for d in yaml.safe_load_all(f) if d]
    return out


@pytest.mark.parametrize("version", ["1.28.0", kubernetes_validate.latest_version()])
def test_kubernetes_manifests_validate(version):
    docs = manifests()
    assert {"namespace.yaml", "serviceaccount.yaml", "daemonset.yaml", "example-opt-in.yaml"} <= set(docs)
    for name, objs in docs.items():
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']}: {e.message} "
                            f"at {'.'.join(map(str, e.path))}")


def pod_spec(name, kind):
    (obj,) = [o for o in manifests()[name] if o["kind"] == kind]
    return obj, obj["spec"]["template"]["spec"]


def host_mounts(spec, container) -> dict[str, dict]:
    """mountPath -> {host path, readOnly} of a container's hostPath mounts."""
    vols = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
    return {m["mountPath"]: {"host": vols[m["name"]], "ro": m.get("readOnly", False)}
            for m in container.get("volumeMounts", []) if m["name"] in vols}


def test_daemonset_and_opt_in_agree():
    ns = {o["metadata"]["name"] for o in manifests()["namespace.yaml"]}
    ds, spec = pod_spec("daemonset.yaml", "DaemonSet")
    assert ds["metadata"]["namespace"] in ns
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    mounts = host_mounts(spec, c)
    for path in ("/sys/fs/bpf", "/sys/fs/cgroup", "/run/shmbypass"):
        assert mounts[path]["host"] == path, (path, mounts)
    assert "/dev/shm" not in mounts, "one-host connections share no region"
    env = {e["name"]: e["value"] for e in c["env"]}
    run_dir = paths.Instance(env["SHMBYPASS_INSTANCE"]).run_dir
    assert run_dir == "/run/shmbypass", "the instance's run dir must be the /run/shmbypass mount"
    script = c["args"][0]
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
    assert 'shmbypass up --cgroup "$SHMBYPASS_CGROUP" $SHMBYPASS_UP_ARGS' in script
    assert c["lifecycle"]["preStop"]["exec"]["command"][:2] == ["shmbypass", "down"]
    assert "--backend" not in env["SHMBYPASS_UP_ARGS"]

    # The opted-in pod: what `shmbypass run --tier shm` gives a program.
    _, pspec = pod_spec("example-opt-in.yaml", "Deployment")
    (app,) = pspec["containers"]
    penv = {e["name"]: e["value"] for e in app["env"]}
    libs = penv["LD_PRELOAD"].split()
    assert [os.path.basename(x) for x in libs] == ["libshmbypass-preload.so",
                                                   "libshmbypass-guard.so"]
    inst = paths.Instance(env["SHMBYPASS_INSTANCE"])
    for lib in libs:
        # where `up` puts them (manager.py), from the files the build makes
        assert os.path.dirname(lib) == os.path.join(inst.run_dir, "lib"), lib
        assert os.path.exists(paths.tool(os.path.basename(lib))), lib
    assert penv["SHMBYPASS_INSTANCE"] == env["SHMBYPASS_INSTANCE"]
    assert "SHMBYPASS_REGION" not in penv, "one-host connections share no region"
    pm = host_mounts(pspec, app)
    # read-only (a pod must not replace the libraries other pods load), but
    # for the inboxes and capture rings each process makes
    assert pm["/run/shmbypass"] == {"host": "/run/shmbypass", "ro": True}
    for sub in ("inbox", control.RING_DIR):
        d = os.path.join(inst.run_dir, sub)
        assert pm[d] == {"host": d, "ro": False}, pm
    assert inst.pin_dir not in pm, "the interposer opens no pin"
