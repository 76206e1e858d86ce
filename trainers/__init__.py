"""kdprobe trainers: the training loop and its recipes (losses, batch transforms)."""
