"""Textual screens. No syscalls here: every action calls app.services."""
