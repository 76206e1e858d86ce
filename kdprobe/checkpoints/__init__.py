"""Checkpoints: kdprobe's self-describing format, other codebases' files (detected by their tensors), fitting data
to a model."""
