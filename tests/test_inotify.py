"""app/services/inotify.py: a full event queue is said, not dropped (no root needed).

The kernel keeps max_queued_events (16,384 here) per inotify instance and then queues one
IN_Q_OVERFLOW instead of what follows; identical consecutive events are merged, so the files
below are touched in turn."""

from __future__ import annotations

import os

from app.services.inotify import PathWatch, WriteCloses


def _queue_limit() -> int:
    with open("/proc/sys/fs/inotify/max_queued_events") as f:
        return int(f.read())


def test_closes_lost_to_a_full_queue_are_said(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(b"")
    two.write_bytes(b"")
    watch = WriteCloses(str(one), [str(two)])
    try:
        for _ in range(_queue_limit() // 2 + 10):
            for node in (one, two):
                os.close(os.open(node, os.O_WRONLY))
        closes = watch.read()
        assert closes[-1] == WriteCloses.OVERFLOW, closes[-3:]
        assert set(closes[:-1]) == {str(one), str(two)}
        os.close(os.open(one, os.O_WRONLY))  # and the watch goes on
        assert watch.read() == [str(one)]
    finally:
        watch.close()


def test_a_full_queue_says_every_watched_path_may_have_changed(tmp_path):
    wanted, other = tmp_path / "config.toml", tmp_path / "socket"
    noise = [tmp_path / "a", tmp_path / "b"]
    watch = PathWatch([wanted, other])
    try:
        for n in range(_queue_limit() // 2 + 10):
            for path in noise:
                path.write_bytes(b"x")  # (close-write events of names not watched)
        assert watch.read() == {str(wanted), str(other)}
        wanted.write_bytes(b"y")
        assert watch.read() == {str(wanted)}
    finally:
        watch.close()
