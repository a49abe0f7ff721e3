"""mirrorfs's inode table keeps directory fds within its bound and reopens evicted ones."""

from __future__ import annotations

import os

from app.engine.inodes import ROOT, InodeTable


def open_fds(under) -> int:
    """Open fds of this process on paths below `under` (counting them all moved when another
    thread of the test process, or the collector, closed something: seen once as 13 == 14 on
    a busy host)."""
    prefix = str(under).rstrip("/")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            where = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        count += where == prefix or where.startswith(prefix + "/")
    return count


def test_directory_fds_stay_bounded_and_evicted_ones_reopen_through_their_parents(tmp_path):
    """A chain 40 deep and 40 siblings, with room for 8 directory fds: every directory is still
    reached (reopened from its nearest open ancestor), fds handed out during a request stay
    valid, and between requests (trim) at most 8 stay open."""
    chain = tmp_path / "/".join(f"c{i}" for i in range(40))
    chain.mkdir(parents=True)
    for i in range(40):
        (tmp_path / f"s{i}").mkdir()
    root_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        table = InodeTable(os.stat(tmp_path), root_fd)
        table.max_dir_fds = 8
        before = open_fds(tmp_path)
        nodes, parent = [], ROOT
        for i in range(40):
            node = table.lookup(parent, b"c%d" % i, os.stat(tmp_path / "/".join(f"c{j}" for j in range(i + 1))))
            nodes.append(node)
            parent = node.ino
        siblings = [table.lookup(ROOT, b"s%d" % i, os.stat(tmp_path / f"s{i}")) for i in range(40)]
        for first, second in ((nodes[-1], siblings[0]), (siblings[1], nodes[20]),
                              (nodes[0], nodes[-1]), (siblings[-1], siblings[-2])):
            for node in siblings:  # what was open before: the siblings
                table.dirfd(node.ino)
                table.trim()
            fd = table.dirfd(first.ino)  # one request, two fds: a whole chain opens for one of them
            other_fd = table.dirfd(second.ino)
            assert (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == first.key
            assert (os.fstat(other_fd).st_dev, os.fstat(other_fd).st_ino) == second.key
            table.trim()
            assert open_fds(tmp_path) - before <= 8
        assert table.path(nodes[-1].ino) == b"/".join(b"c%d" % i for i in range(40))
        for node in nodes + siblings:
            table.forget(node.ino, 1)
        assert open_fds(tmp_path) == before  # forgotten directories close their fds
    finally:
        os.close(root_fd)
