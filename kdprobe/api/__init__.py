"""The public Python API: load checkpoints and datasets, run every probe, train, prune and run studies.

The CLI is a thin shell over these functions: the same inputs give the same numbers from both. Every
function is re-exported at the top level (`kdprobe.agreement(...)`), which is where to import them from."""
