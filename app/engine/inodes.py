"""mirrorfs's inode table: FUSE inode numbers for lower (st_dev, st_ino) pairs, their names, and
an O_PATH fd for each directory in use.

The kernel speaks in inode numbers; the journal and the target speak in paths. A node keeps
every (parent, name) it is known by, so hard links work, renames move one name (children follow
because their paths are built through their parents), and a file that has lost every name
(unlinked while open) is known to have no path: its later writes are not replicated because the
target has already removed it.

The lower tree is reached relative to the parent directory's fd, never by a path from the
entry's root: a path below the entry may be longer than PATH_MAX although each call's own name
is short, and an fd follows its directory through renames. Directory fds are opened when first
needed, from the nearest ancestor that has one; between requests (`trim`), the least recently
used are closed again beyond a bound set by the process's file limit. Never during a request:
a handler may hold two of them (rename, link).
"""

from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict

from app.engine.fusewire import ROOT_ID

ROOT = ROOT_ID
DIR_OPEN = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Node:
    __slots__ = ("ino", "key", "lookups", "links", "captured", "is_dir", "fd", "tmp")

    def __init__(self, ino: int, key: tuple[int, int], captured: bool, is_dir: bool):
        self.ino = ino
        self.key = key
        self.lookups = 0
        self.links: dict[tuple[int, bytes], None] = {}  # ordered set of (parent ino, name)
        self.captured = captured
        self.is_dir = is_dir
        self.fd = -1  # O_PATH fd of a directory, while open
        self.tmp = 0  # an O_TMPFILE file not linked yet: the seq of its "tmpfile" record


class InodeTable:
    def __init__(self, root_st: os.stat_result, root_fd: int):
        self.root_dev = root_st.st_dev
        root = Node(ROOT, (root_st.st_dev, root_st.st_ino), True, True)
        root.lookups = 1
        root.fd = root_fd  # the caller's: never closed here
        self._nodes: dict[int, Node] = {ROOT: root}
        self._by_key: dict[tuple[int, int], int] = {root.key: ROOT}
        self._dentries: dict[tuple[int, bytes], int] = {}
        self._next = ROOT + 1
        self._open_dirs: OrderedDict[int, None] = OrderedDict()  # least recently used first
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_dir_fds = max(64, soft // 2)

    def node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise OSError(errno.ENOENT, "unknown inode", str(ino))
        return node

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def link(self, node: Node) -> tuple[int, bytes] | None:
        """One (parent, name) of `node` whose parent is still known (a hard link's other
        parent may have been forgotten by the kernel), or None when it has no name."""
        for link in node.links:
            if link[0] in self._nodes:
                return link
        return None

    def path(self, ino: int) -> bytes | None:
        """The entry-relative path of `ino` (b"" for the root), or None when it has no name."""
        parts = []
        while ino != ROOT:
            node = self._nodes.get(ino)
            link = None if node is None else self.link(node)
            if link is None:
                return None
            ino, name = link
            parts.append(name)
        return b"/".join(reversed(parts))

    def child_path(self, parent: int, name: bytes) -> bytes | None:
        base = self.path(parent)
        if base is None:
            return None
        return name if not base else base + b"/" + name

    # -- where a node is on the lower tree --------------------------------------------------------
    def dirfd(self, ino: int) -> int:
        """The O_PATH fd of directory `ino`, opened (with its closed ancestors) if need be."""
        node = self.node(ino)
        if node.fd >= 0:
            if ino != ROOT:
                self._open_dirs.move_to_end(ino)
            return node.fd
        chain = []
        while node.fd < 0:
            link = self.link(node)
            if link is None:
                raise OSError(errno.ENOENT, "directory has no name left", str(node.ino))
            chain.append((node, link[1]))
            node = self.node(link[0])
        fd = node.fd
        for child, name in reversed(chain):
            cfd = os.open(name, DIR_OPEN, dir_fd=fd)
            st = os.fstat(cfd)
            if (st.st_dev, st.st_ino) != child.key:
                os.close(cfd)
                raise OSError(errno.ESTALE, "directory changed under its name", os.fsdecode(name))
            child.fd = fd = cfd
            self._open_dirs[child.ino] = None
        return fd

    def at(self, ino: int) -> tuple[int, bytes]:
        """(dir fd, name) for an *at() call on `ino`: a directory through its own fd and ".",
        anything else through its parent's fd and its name."""
        node = self.node(ino)
        if node.is_dir:
            return self.dirfd(ino), b"."
        link = self.link(node)
        if link is None:
            raise OSError(errno.ENOENT, "no name left", str(ino))
        return self.dirfd(link[0]), link[1]

    def trim(self) -> None:
        """Close the least recently used directory fds beyond the bound (between requests)."""
        while len(self._open_dirs) > self.max_dir_fds:
            self._close_dir(self._nodes[next(iter(self._open_dirs))])

    def _close_dir(self, node: Node) -> None:
        if node.fd >= 0 and node.ino != ROOT:
            os.close(node.fd)
            node.fd = -1
            self._open_dirs.pop(node.ino, None)

    # -- the kernel's references ------------------------------------------------------------------
    def entry(self, parent: int, name: bytes, st: os.stat_result) -> Node:
        """The node for `name` in `parent` (made if new), without counting a lookup."""
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            is_dir = (st.st_mode & 0o170000) == 0o040000
            node = Node(ino, key, st.st_dev == self.root_dev and self._nodes[parent].captured, is_dir)
            self._nodes[ino] = node
            self._by_key[key] = ino
        node = self._nodes[ino]
        old = self._dentries.get((parent, name))
        if old is not None and old != ino and old in self._nodes:
            self._nodes[old].links.pop((parent, name), None)
        self._dentries[(parent, name)] = ino
        node.links[(parent, name)] = None
        return node

    def anonymous(self, parent: int, st: os.stat_result) -> Node:
        """A node with no name yet (an O_TMPFILE file made in `parent`), looked up once by the
        reply that made it."""
        node = Node(self._next, (st.st_dev, st.st_ino),
                    st.st_dev == self.root_dev and self._nodes[parent].captured, False)
        self._next += 1
        self._nodes[node.ino] = node
        self._by_key[node.key] = node.ino
        node.lookups = 1
        return node

    def lookup(self, parent: int, name: bytes, st: os.stat_result) -> Node:
        node = self.entry(parent, name, st)
        node.lookups += 1
        return node

    def drop_if_unused(self, node: Node) -> None:
        if node.lookups <= 0 and node.ino != ROOT:
            self._drop(node)

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.lookups -= count
        if node.lookups <= 0:
            self._drop(node)

    def _drop(self, node: Node) -> None:
        self._close_dir(node)
        self._nodes.pop(node.ino, None)
        if self._by_key.get(node.key) == node.ino:
            del self._by_key[node.key]
        for link in node.links:
            if self._dentries.get(link) == node.ino:
                del self._dentries[link]

    def unlinked(self, parent: int, name: bytes) -> None:
        ino = self._dentries.pop((parent, name), None)
        if ino is not None and ino in self._nodes:
            self._nodes[ino].links.pop((parent, name), None)

    def renamed(self, p1: int, n1: bytes, p2: int, n2: bytes, exchange: bool) -> None:
        a = self._dentries.pop((p1, n1), None)
        b = self._dentries.pop((p2, n2), None)
        if a is not None and a in self._nodes:
            self._nodes[a].links.pop((p1, n1), None)
            self._nodes[a].links[(p2, n2)] = None
            self._dentries[(p2, n2)] = a
        if b is not None and b in self._nodes:
            self._nodes[b].links.pop((p2, n2), None)
            if exchange:
                self._nodes[b].links[(p1, n1)] = None
                self._dentries[(p1, n1)] = b
