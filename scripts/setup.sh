#!/usr/bin/env bash
# Installs everything Tresor and its test suite need on a fresh Debian 12 machine (run as root):
# the Debian packages (QEMU, libvirt, qemu-img, Ceph radosgw for the S3 tests, filesystem tools
# for the file-restore tests, sshd for the qemu+ssh:// lab hosts, the peer tools for benchmarks),
# then the npm packages (which pin Node 24 for the npm scripts). Idempotent: packages already present are not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  qemu-system-x86 qemu-utils qemu-guest-agent libvirt-daemon-system libvirt-clients
  e2fsprogs dosfstools mtools ntfs-3g gdisk fdisk xfsprogs exfatprogs exfat-fuse attr lvm2 zstd time
  nbdkit libnbd-bin busybox-static openssl openssh-server
  ceph-mon ceph-osd radosgw
  restic borgbackup virtnbdbackup
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm ci fails on optional platform packages here; install against the committed lockfile.
npm install --no-audit --no-fund --loglevel=error
node_modules/.bin/node --version

# libvirt without systemd: give /dev/kvm the owner and mode Debian's udev rule would (without it
# libvirt re-probes QEMU forever), then start virtlogd and libvirtd unless they already answer.
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd did not start" >&2; exit 1; }
fi
