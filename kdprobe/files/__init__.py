"""Files kdprobe reads and writes: atomic writes and locks, output-path rules and file kinds, safe torch loading."""
