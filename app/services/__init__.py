"""The service layer: kernel loop ioctls, mount syscalls, config, device probing.

Nothing in this package imports Textual; tests/test_import_hygiene.py proves it.
"""
