"""Datasets as tensors: digits, CIFAR, image folders and archives (decoded once, cached by content), preprocessing."""
