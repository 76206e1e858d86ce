"""The machine and its numerics: what CPU/GPU a result came from, and what fp32 and determinism mean on it."""
