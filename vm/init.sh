#!/bin/busybox sh
# sbvm guest init: PID 1 in the initramfs. Loads the modules, mounts the
# host's root read-only over virtio-9p at /newroot with tmpfs on the writable
# directories, configures eth0, then hands over to busybox init, which keeps
# the agent (vm/agent.py, run with the host's Python inside a chroot) alive
# and reaps orphans.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "sbvm-init: [$(cut -d' ' -f1 /proc/uptime)] $*" > /dev/console; }
fail() { say "FATAL: $*"; exec sh; }

for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done
say "modules loaded"

NAME=guest; IP=; PY=; AGENT=; CWD=/; REPO=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        sbvm.name=*) NAME=${arg#*=} ;;
        sbvm.ip=*) IP=${arg#*=} ;;
        sbvm.python=*) PY=${arg#*=} ;;
        sbvm.agent=*) AGENT=${arg#*=} ;;
        sbvm.cwd=*) CWD=${arg#*=} ;;
        sbvm.repo=*) REPO=${arg#*=} ;;
    esac
done
hostname "sbvm-$NAME"

R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot $R \
    || fail "cannot mount the host root over 9p"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
for d in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs $R$d; done
for d in /run /mnt; do mount -t tmpfs -o mode=755 tmpfs $R$d; done
mount -t tmpfs -o mode=755 cgroup $R/sys/fs/cgroup
# The project has a share of its own: a checkout under /tmp or /run (CI's
# clone, say) would be hidden by the tmpfs above.
if [ -n "$REPO" ]; then
    mkdir -p $R$REPO 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 repo $R$REPO \
        || fail "cannot mount the project at $REPO over 9p"
fi
mkdir $R/sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup/unified
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null

ip link set lo up
if [ -n "$IP" ] && [ -e /sys/class/net/eth0 ]; then
    ip addr add "$IP" dev eth0
    ip link set eth0 up
fi

PORT=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "@PORTNAME@" ] && PORT=/dev/${p##*/}
done
[ -n "$PORT" ] || fail "no virtio-serial port named @PORTNAME@"
chroot $R /bin/sh -c "[ -x '$PY' ]" || fail "no python at $PY in the host root"
cat > /etc/inittab <<EOF
::respawn:/bin/chroot $R $PY $AGENT --port $PORT --name $NAME --cwd $CWD
::ctrlaltdel:/bin/poweroff -f
EOF
say "root mounted, network up, starting the agent on $PORT"
exec /bin/busybox init
