"""kdprobe's version (one place: the package, checkpoints and summaries read it here)."""
__version__ = "0.1.0"
