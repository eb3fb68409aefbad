"""Build everything native the package ships.

cffi builds ``shmbypass._native`` (libbpf binding + the ring). After it, the
makefiles in bpf/ and native/ build the BPF objects (``shmbypass/_bpf``), the
LD_PRELOAD interposer and the C tools (``shmbypass/_bin``). In an editable
install (``pip install -e .``) they are built in place.
"""
import os
import subprocess

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildNative(build_ext):
    def run(self):
        super().run()
        if self.inplace or getattr(self, "editable_mode", False):
            pkg = os.path.join(ROOT, "shmbypass")
        else:
            pkg = os.path.join(os.path.abspath(self.build_lib), "shmbypass")
        for sub in ("bpf", "native"):
            subprocess.check_call(["make", "-s", "-C", os.path.join(ROOT, sub), f"PKG={pkg}"])


setup(
    cffi_modules=["native/build_ffi.py:ffibuilder"],
    cmdclass={"build_ext": BuildNative},
)
