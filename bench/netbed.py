"""Figures of the two-host test bed (run by hand as root: `.venv/bin/python bench/netbed.py`).

1. ssh connect time: `ssh TARGET true`, direct and through the relay (no delay), N=20, median.
2. Dead-link detection: a session `sleep 600`, `ip link set down`, time until ssh exits, with
   ServerAliveInterval/CountMax 1×3 and 2×3, 3 runs each.
3. tbf accuracy: 32 MiB over plain TCP and over ssh (`cat >/dev/null`) through tbf at 20, 50
   and 100 Mbit/s; achieved / configured rate.
4. Relay overhead: 128 MiB through ssh direct vs through the relay; round trip of a line echoed
   by a remote `cat`, direct vs relay (N=200, median).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from netbed import TwoHosts  # noqa: E402

MiB = 1 << 20
SINK = ("import socket, sys\n"
        "s = socket.create_server((sys.argv[1], int(sys.argv[2])))\n"
        "while True:\n"
        "    c, _ = s.accept()\n"
        "    n = 0\n"
        "    while (b := c.recv(1 << 20)):\n"
        "        n += len(b)\n"
        "    c.sendall(str(n).encode())\n"
        "    c.close()\n")


def timed(argv, **kw) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, **kw)
    return time.monotonic() - t0


def connect_time(bed: TwoHosts, relay) -> None:
    direct = [timed(bed.ssh_argv("true")) for _ in range(20)]
    via = [timed(bed.ssh_argv("true", via=relay)) for _ in range(20)]
    print(f"ssh connect+true: direct median {statistics.median(direct) * 1000:.0f} ms "
          f"(min {min(direct) * 1000:.0f}), via relay {statistics.median(via) * 1000:.0f} ms")


def detection(bed: TwoHosts) -> None:
    for interval in (1, 2):
        times = []
        for _ in range(3):
            s = subprocess.Popen(bed.ssh_argv("echo", "up;", "exec", "sleep", "600",
                                              alive_interval=interval, alive_count=3),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert s.stdout.readline() == b"up\n"
            t0 = time.monotonic()
            bed.link_down()
            s.communicate(timeout=120)
            times.append(time.monotonic() - t0)
            bed.link_up()
        print(f"link down detected with ServerAlive {interval} s x 3: "
              + ", ".join(f"{t:.2f}" for t in times) + " s")


def tcp_transfer(bed: TwoHosts, port: int, size: int) -> float:
    chunk = os.urandom(MiB)
    t0 = time.monotonic()
    with socket.create_connection((bed.target_addr, port)) as c:
        for _ in range(size // MiB):
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        assert int(c.recv(64)) == size
    return time.monotonic() - t0


def tbf_accuracy(bed: TwoHosts) -> None:
    port = bed.port + 1
    bed.spawn_on_target([sys.executable, "-c", SINK, bed.target_addr, str(port)])
    time.sleep(0.5)
    size = 32 * MiB
    payload = os.urandom(size)
    for mbit in (20, 50, 100):
        bed.rate_limit(rate=f"{mbit}mbit", burst="64kb", latency="50ms")
        tcp = size * 8 / tcp_transfer(bed, port, size) / 1e6
        ssh = size * 8 / timed(bed.ssh_argv("cat", ">/dev/null"), input=payload) / 1e6
        print(f"tbf {mbit} Mbit/s: plain TCP {tcp:.1f} Mbit/s ({tcp / mbit:.1%}), "
              f"ssh payload {ssh:.1f} Mbit/s ({ssh / mbit:.1%})")
        bed.unlimit()


def echo_rtts(argv: list[str], n: int = 200) -> list[float]:
    s = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    s.stdin.write(b"warm\n")
    s.stdin.flush()
    s.stdout.readline()
    rtts = []
    for _ in range(n):
        t0 = time.monotonic()
        s.stdin.write(b"x\n")
        s.stdin.flush()
        s.stdout.readline()
        rtts.append(time.monotonic() - t0)
    s.stdin.close()
    s.wait()
    return rtts


def relay_overhead(bed: TwoHosts, relay) -> None:
    payload = os.urandom(128 * MiB)
    for name, via in (("direct", None), ("relay", relay), ("direct", None), ("relay", relay)):
        t = timed(bed.ssh_argv("cat", ">/dev/null", via=via), input=payload)
        print(f"128 MiB through ssh {name}: {128 / t:.1f} MiB/s")
    for name, via in (("direct", None), ("relay", relay)):
        rtt = statistics.median(echo_rtts(bed.ssh_argv("cat", via=via)))
        print(f"echo round trip {name}: median {rtt * 1e6:.0f} us")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, TwoHosts(Path(tmp)) as bed:
        relay = bed.relay()
        connect_time(bed, relay)
        detection(bed)
        tbf_accuracy(bed)
        relay_overhead(bed, relay)


if __name__ == "__main__":
    main()
