#!/usr/bin/env bash
# Install everything mirrorsetup needs on Debian 12 (as root) into ./.venv; safe to run again.
#   packaging/setup.sh          runtime only
#   packaging/setup.sh --test   runtime + the test and snapshot tools
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ "$(id -u)" -ne 0 ]; then
    echo "packaging/setup.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fuse3/libfuse3-dev/pkg-config/gcc: pyfuse3 builds against libfuse3; e2fsprogs, xfsprogs,
# lvm2 (pvcreate) and util-linux (losetup, mkswap, findmnt) are used by the tests as witnesses.
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev libudev1 \
    util-linux e2fsprogs xfsprogs lvm2 kmod >/dev/null
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".$extras"
