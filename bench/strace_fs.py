"""Issue 14, by hand: system calls per small file of mirrorfs servers (strace -c -f), as root.

    .venv/bin/python bench/strace_fs.py KIND [KIND ...]

KIND is a bench/dispatch.py server kind, e.g. mirrorfs+applier, or KIND@DIR for the code of the
checkout DIR (`git archive REV app | tar x -C DIR`). Each server runs on a private tmpfs while
2000 files of 4 KiB are created, written and closed through it; strace counts every system call
of all its threads, printed per file. Everything is unmounted and removed at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dispatch  # noqa: E402

FILES = 2000


def count(kind: str) -> dict[str, float]:
    w = tempfile.mkdtemp(prefix="mirrorsetup-strace-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "strace", w], check=True)
    srv = st = None
    try:
        for d in ("l", "m", "t"):
            os.mkdir(f"{w}/{d}")
        srv = subprocess.Popen([sys.executable, dispatch.__file__, "--serve", kind, f"{w}/l", f"{w}/m", f"{w}/t",
                                f"{w}/s"], cwd=dispatch.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.ismount(f"{w}/m"):
            if srv.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not mount")
            time.sleep(0.05)
        st = subprocess.Popen(["strace", "-c", "-f", "-o", f"{w}/out", "-p", str(srv.pid)], stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached to every thread
        dispatch.small_files(f"{w}/m/d", FILES)
        st.send_signal(signal.SIGINT)
        st.wait()
        rows = {}
        for line in Path(f"{w}/out").read_text().splitlines()[2:]:
            f = line.split()
            if len(f) >= 5 and f[3].isdigit() and f[-1] != "total":
                rows[f[-1]] = int(f[3]) / FILES
        return rows
    finally:
        if st is not None and st.poll() is None:
            st.kill()
            st.wait()
        subprocess.run(["umount", f"{w}/m"], capture_output=True)
        if srv is not None:
            try:
                srv.wait(timeout=30)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
        subprocess.run(["umount", w], capture_output=True)
        os.rmdir(w)


def main() -> int:
    if os.geteuid() != 0 or len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for kind in sys.argv[1:]:
        rows = count(kind)
        print(f"{kind}: {sum(rows.values()):.1f} system calls per file: " + ", ".join(
            f"{name} {n:.2f}" for name, n in sorted(rows.items(), key=lambda kv: -kv[1]) if n >= 0.05))
    return 0


if __name__ == "__main__":
    sys.exit(main())
