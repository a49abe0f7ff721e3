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
# openssh-server, nftables, iproute2: the two-host test bed (tests/netbed.py) runs its own sshd
# in a network namespace (ip netns, veth, tc tbf) and makes faults with nft drop/reject; acl:
# setfacl/getfacl, the POSIX ACL tests' witnesses (not on every Debian image); strace: stops a
# process at a chosen system call (test_replica_remove: an agent before it writes its state).
test_packages=""
fresh_sshd=""
if [ -n "$extras" ]; then
    test_packages="openssh-server nftables iproute2 acl groff-base strace"
    dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "install ok installed" \
        || fresh_sshd=1
fi
# The system's sshd must be neither started nor enabled by openssh-server's postinst (on an
# install or an upgrade): a policy-rc.d answering 101 ("action forbidden") for ssh's units makes
# invoke-rc.d and deb-systemd-invoke skip it; other services are allowed (0). Ours is removed
# on exit; a policy-rc.d that was already there is used as it is.
policy=/usr/sbin/policy-rc.d
if [ -n "$test_packages" ] && [ ! -e "$policy" ]; then
    cat >"$policy" <<'EOF'
#!/bin/sh
# written by mirrorsetup packaging/setup.sh for its apt-get install: ssh is not started
[ "$1" = --quiet ] && shift
case "$1" in ssh | ssh.service | ssh.socket | rescue-ssh.target) exit 101 ;; esac
exit 0
EOF
    chmod 755 "$policy"
    trap 'grep -qs "mirrorsetup packaging/setup.sh" "$policy" && rm -f "$policy"' EXIT
fi
# fuse3: fusermount for the FUSE mounts; gcc/python3-dev: pip builds app/engine/_fuseread.c;
# libfuse3-dev/pkg-config/gcc: the benches build libfuse's
# passthrough_ll (the FUSE limit they compare against); e2fsprogs, xfsprogs,
# lvm2 (pvcreate) and util-linux (losetup, mkswap, findmnt, nsenter) are used by the tests as
# witnesses; openssh-client carries replication to remote targets.
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev libudev1 \
    util-linux e2fsprogs xfsprogs lvm2 kmod openssh-client $test_packages >/dev/null
if [ -n "$fresh_sshd" ]; then
    # Installed just now for the tests only: take back the postinst's boot-time enabling.
    deb-systemd-helper disable ssh.service ssh.socket >/dev/null 2>&1 || true
    update-rc.d ssh disable >/dev/null 2>&1 || true
fi
modprobe loop 2>/dev/null || true
modprobe fuse 2>/dev/null || true
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".$extras"
# Byte-compile the project now: an editable install leaves that to each first import, and with
# PYTHONDONTWRITEBYTECODE set (or a read-only tree) every start of the CLI, the daemon and the
# target's agent (sshd's forced command, once per session) would compile ~20 modules again:
# `fs add` took 0.12 s instead of 0.09 s, the agent's imports 0.12 s instead of 0.075 s (medians of 15).
.venv/bin/python -m compileall -q app >/dev/null
