"""The kdprobe command-line interface (typer)."""
