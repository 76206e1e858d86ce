"""Studies: the TOML spec of an experiment, its bundled specs (specs/*.toml), its result and the ensemble reading."""
