"""mirrorsetup: choose what is replicated and watch, live, whether it is."""

__version__ = "0.1.0"
