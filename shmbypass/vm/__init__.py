"""The IVSHMEM VM pair: two QEMU guests sharing one region (vm/README.md).

image.py        the guest kernel + initramfs, from Debian packages (vm/init.sh is PID 1)
qemu.py         QEMU processes: PDEATHSIG, the KVM probe, the sweep of stale runs
agent.py        the host end of the guest agents' channel (vm/agent.py runs in the guests)
pair.py         VMPair: boot both guests, run commands in them, tear them down
status.py       `vm status` / `vm format`: a region file or BAR, read-only, with liveness
bench.py        `vm bench`: guest-to-guest TCP vs the IVSHMEM bypass
guest_bench.py  the client side of `vm bench`, run in guest A
cli.py          `shmbypass vm ...` and `python -m shmbypass.vm ...`

The BAR itself (finding the device, mapping it, the region's parts) is the
ivshmem region backend's: shmbypass.region.ivshmem.
"""
