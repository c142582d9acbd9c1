#!/usr/bin/env bash
# Installs the system tools that tests and benches use, when missing.
# Needs root and Debian/Ubuntu apt; elsewhere it says what is missing and goes on
# (a test that needs a missing tool fails naming it; tests/test_powercut.py and
# tests/test_flood.py fail without cc, which builds the LD_PRELOAD shim and the
# flood generator: they must not pass unchecked).
set -u
declare -A pkg=([cpio]=cpio [mkfs.ext4]=e2fsprogs [sfdisk]=fdisk [zstd]=zstd [partclone.ext4]=partclone [cc]=gcc
                [systemd-analyze]=systemd [openssl]=openssl [curl]=curl
                [mkntfs]=ntfs-3g [mkfs.vfat]=dosfstools [mcopy]=mtools [udp-sender]=udpcast)
# The PXE site server and its tests (docs/pxe.md): dnsmasq is the engine, and
# QEMU's iPXE ROM PXE-boots a VM (a Debian kernel, a busybox initrd) in a
# network namespace. Checked by file, since these are not all commands. The MQTT
# wake-up's tests start their own mosquitto (not the system's broker on 1883) and
# fail without it.
declare -A file=([/usr/sbin/dnsmasq]=dnsmasq-base [/usr/bin/qemu-system-x86_64]=qemu-system-x86
                 [/usr/sbin/nginx]=nginx-light
                 [/usr/lib/ipxe/qemu/pxe-virtio.rom]=ipxe-qemu [/usr/lib/ipxe/undionly.kpxe]=ipxe
                 [/bin/busybox]=busybox-static [/sbin/ip]=iproute2
                 [/usr/bin/strip]=binutils
                 [/usr/sbin/mosquitto]=mosquitto)
missing=()
for tool in "${!pkg[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] || missing+=("${pkg[$tool]}")
done
for path in "${!file[@]}"; do
  [ -e "$path" ] || missing+=("${file[$path]}")
done
compgen -G '/boot/vmlinuz-*' >/dev/null || missing+=(linux-image-amd64)
# The task server's PostgreSQL tests start their own cluster (tests/pgcluster.py) from
# the server binaries, which are not on PATH; they fail naming the package when missing.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
# The .deb the packaging test installs needs the system python3 with venv (ensurepip).
/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system tools: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  (apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "warning: could not install ${missing[*]}; tests needing them will skip" >&2
else
  echo "warning: missing system tools (${missing[*]}); install them as root" >&2
fi
exit 0
