"""The guest image of the VM pair: a Debian kernel and an initramfs holding
busybox, the kernel modules the guests need and the init script
(vm/init.sh), built from Debian packages only and cached in
build/vm/<package>_<version>-<recipe hash>/ (vm/README.md)."""
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile

from shmbypass import paths
from shmbypass.errors import VMError

BUILD_DIR = os.path.join(paths.BUILD_DIR, "vm")
KERNEL_META_PKG = "linux-image-amd64"
BUSYBOX = "/bin/busybox"  # from Debian's busybox-static
# What the guest needs from the kernel deb (dependencies are added from each
# module's .modinfo, in load order): the virtio PCI transport, the NIC, the
# agent's serial port, 9p for the root filesystem, and TCP socket diagnostics
# (`ss`, pyroute2's inet_diag, which `shmbypass status` uses).
GUEST_MODULES = ["virtio_pci", "virtio_net", "virtio_console", "9pnet_virtio", "9p", "tcp_diag"]
IMAGE_FORMAT = 2  # bump when the initramfs recipe changes in a way the hash can't see
AGENT_PORT_NAME = "sbvm.agent"  # the virtio-serial port the guest agent talks on
# PID 1 of the initramfs (a shell program of its own, vm/init.sh).
with open(os.path.join(paths.ROOT, "vm", "init.sh")) as _f:
    INIT_SCRIPT = _f.read().replace("@PORTNAME@", AGENT_PORT_NAME)


@dataclasses.dataclass
class GuestImage:
    dir: str
    kernel: str
    initrd: str
    package: str
    version: str
    kernel_release: str


def _apt_field(args, prefix):
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise VMError(f"{' '.join(args)}: no '{prefix}' line")


def kernel_package():
    """(package, version) of the kernel linux-image-amd64 points at, from apt's cache."""
    pkg = _apt_field(["apt-cache", "depends", KERNEL_META_PKG], "Depends: ")
    ver = _apt_field(["apt-cache", "show", "--no-all-versions", pkg], "Version: ")
    return pkg, ver


def _recipe_hash():
    h = hashlib.sha256()
    h.update(f"{IMAGE_FORMAT}\n{INIT_SCRIPT}\n{GUEST_MODULES}\n".encode())
    with open(BUSYBOX, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:10]


def _modinfo(path):
    """key -> [values] from a kernel module's .modinfo ELF section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise VMError(f"{path}: not an ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = section(shstrndx)
    info = {}
    for i in range(shnum):
        name, off, size = section(i)
        if data[stroff + name:data.index(b"\0", stroff + name)] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def _module_closure(moddir, wanted):
    """Module paths for `wanted` and everything they depend on, in load order."""
    index = {}
    for dirpath, _dirs, files in os.walk(moddir):
        for fn in files:
            if fn.endswith(".ko"):
                index[fn[:-3].replace("-", "_")] = os.path.join(dirpath, fn)
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise VMError(f"module {name} not in the kernel package (built in? then drop it)")
        for dep in _modinfo(index[name]).get("depends", [""])[0].split(","):
            if dep:
                visit(dep)
        order.append(name)
    for w in wanted:
        visit(w)
    return [(n, index[n]) for n in order]


class _Cpio:
    """A newc cpio archive written in memory, with fixed mtimes (repeatable)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = itertools.count(1)

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            next(self.ino), mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, 0o040755)

    def file(self, name, data, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _find_image():
    """The newest image already built (for hosts where apt can't answer)."""
    best = None
    if os.path.isdir(BUILD_DIR):
        for d in os.listdir(BUILD_DIR):
            man = os.path.join(BUILD_DIR, d, "manifest.json")
            if os.path.exists(man) and (best is None or os.path.getmtime(man) > os.path.getmtime(best)):
                best = man
    return best


def _extract_pvh_vmlinux(d):
    """Unpack the kernel ELF from the xz-compressed bzImage, when the kernel
    can boot through PVH (QEMU then loads the ELF directly). Under TCG this
    skips the in-guest xz decompression: seconds per boot."""
    with open(os.path.join(d, "config")) as f:
        if "CONFIG_PVH=y\n" not in f.read():
            return False
    with open(os.path.join(d, "vmlinuz"), "rb") as f:
        bz = f.read()
    at = bz.find(b"\xfd7zXZ\x00")
    if at < 0:
        return False
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = dec.decompress(bz[at:])
    except lzma.LZMAError:
        return False
    if not dec.eof or elf[:4] != b"\x7fELF":
        return False
    with open(os.path.join(d, "vmlinux"), "wb") as f:
        f.write(elf)
    return True


def _load_image(manifest):
    with open(manifest) as f:
        m = json.load(f)
    d = os.path.dirname(manifest)
    return GuestImage(d, os.path.join(d, m.get("boot_kernel", "vmlinuz")), os.path.join(d, "initrd.img"),
                      m["package"], m["version"], m["kernel_release"])


def build_image(force=False, log=None):
    """Build (or find in the cache) the guest kernel + initramfs; return a GuestImage.

    Cached in build/vm/<package>_<version>-<recipe hash>/; a second call only
    asks apt's local cache which kernel package is current.
    """
    log = log or (lambda msg: None)
    if not os.path.exists(BUSYBOX):
        raise VMError(f"{BUSYBOX} missing: install Debian's busybox-static (scripts/setup.sh does)")
    try:
        try:
            pkg, ver = kernel_package()
        except (subprocess.CalledProcessError, VMError):
            # no package lists yet (a fresh machine whose packages were all present)
            subprocess.run(["apt-get", "update", "-qq"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pkg, ver = kernel_package()
    except (OSError, subprocess.CalledProcessError, VMError) as e:
        found = _find_image()
        if found and not force:
            return _load_image(found)
        raise VMError(f"cannot ask apt for the kernel package ({e})") from None
    out = os.path.join(BUILD_DIR, f"{pkg}_{ver}-{_recipe_hash()}")
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest) and not force:
        return _load_image(manifest)

    os.makedirs(BUILD_DIR, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".work-", dir=BUILD_DIR)
    try:
        log(f"downloading {pkg} {ver}")
        # apt's sandbox user can't write into root's build dir: that is only a warning
        subprocess.run(["apt-get", "download", "-q", f"{pkg}={ver}"], cwd=work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb, = [f for f in os.listdir(work) if f.endswith(".deb")]
        x = os.path.join(work, "x")
        subprocess.run(["dpkg-deb", "-x", os.path.join(work, deb), x], check=True)
        kernel, = [f for f in os.listdir(os.path.join(x, "boot")) if f.startswith("vmlinuz-")]
        krel = kernel[len("vmlinuz-"):]
        mods = _module_closure(os.path.join(x, "lib", "modules", krel), GUEST_MODULES)
        log(f"kernel {krel}; modules: {' '.join(n for n, _ in mods)}")

        cpio = _Cpio()
        for d in ("bin", "dev", "etc", "proc", "sys", "newroot", "lib", "lib/modules", "tmp"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        with open(BUSYBOX, "rb") as f:
            cpio.file("bin/busybox", f.read(), 0o755)
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("etc/modules.order", "".join(f"{n}\n" for n, _ in mods).encode())
        for name, path in mods:
            with open(path, "rb") as f:
                cpio.file(f"lib/modules/{name}.ko", f.read())
        stage = os.path.join(work, "out")
        os.makedirs(stage)
        with open(os.path.join(stage, "initrd.img"), "wb") as f:
            f.write(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
        shutil.copy(os.path.join(x, "boot", kernel), os.path.join(stage, "vmlinuz"))
        shutil.copy(os.path.join(x, "boot", f"config-{krel}"), os.path.join(stage, "config"))
        boot_kernel = "vmlinuz"
        if _extract_pvh_vmlinux(stage):
            boot_kernel = "vmlinux"
        log(f"boots {boot_kernel}")
        with open(os.path.join(stage, "manifest.json"), "w") as f:
            json.dump({"package": pkg, "version": ver, "kernel_release": krel, "boot_kernel": boot_kernel,
                       "modules": [n for n, _ in mods], "recipe": _recipe_hash()}, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(stage, out)
        for d in os.listdir(BUILD_DIR):  # images of older recipes or kernels
            old = os.path.join(BUILD_DIR, d)
            if old != out and os.path.exists(os.path.join(old, "manifest.json")):
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"image in {out}")
    return _load_image(manifest)
