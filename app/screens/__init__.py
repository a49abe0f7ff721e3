"""Textual screens. No syscalls here: every action calls app.services (in thread workers).
Which screens exist, and their keys, is app.screens.actions."""
