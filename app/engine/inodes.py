"""mirrorfs's inode table: FUSE inode numbers for lower (st_dev, st_ino) pairs, and their names.

The kernel speaks in inode numbers; the journal and the target speak in paths. A node keeps
every (parent, name) it is known by, so hard links work, renames move one name (children follow
because their paths are built through their parents), and a file that has lost every name
(unlinked while open) is known to have no path: its later writes are not replicated because the
target has already removed it.
"""

from __future__ import annotations

import os

import pyfuse3

ROOT = pyfuse3.ROOT_INODE


class Node:
    __slots__ = ("ino", "key", "lookups", "links", "captured", "is_dir")

    def __init__(self, ino: int, key: tuple[int, int], captured: bool, is_dir: bool):
        self.ino = ino
        self.key = key
        self.lookups = 0
        self.links: dict[tuple[int, bytes], None] = {}  # ordered set of (parent ino, name)
        self.captured = captured
        self.is_dir = is_dir


class InodeTable:
    def __init__(self, root_st: os.stat_result):
        self.root_dev = root_st.st_dev
        root = Node(ROOT, (root_st.st_dev, root_st.st_ino), True, True)
        root.lookups = 1
        self._nodes: dict[int, Node] = {ROOT: root}
        self._by_key: dict[tuple[int, int], int] = {root.key: ROOT}
        self._dentries: dict[tuple[int, bytes], int] = {}
        self._next = ROOT + 1

    def node(self, ino: int) -> Node:
        return self._nodes[ino]

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def path(self, ino: int) -> bytes | None:
        """The entry-relative path of `ino` (b"" for the root), or None when it has no name."""
        parts = []
        while ino != ROOT:
            node = self._nodes.get(ino)
            if node is None or not node.links:
                return None
            ino, name = next(iter(node.links))
            parts.append(name)
        return b"/".join(reversed(parts))

    def child_path(self, parent: int, name: bytes) -> bytes | None:
        base = self.path(parent)
        if base is None:
            return None
        return name if not base else base + b"/" + name

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
