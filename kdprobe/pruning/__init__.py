"""Pruning surgery: L1 filter pruning, Network Slimming, weight-level masks, and size counts.

Structured methods (l1_prune, slimming_prune) return a NEW, physically smaller model built
through `create_model`, whose `.arch` kwargs carry the pruned widths, so a checkpoint of it
rebuilds without the original. Weight-level pruning zeroes weights in place and returns
bool masks keyed by state_dict name, which the training loop re-applies after each step.
"""
from kdprobe.pruning.flops import count_flops, count_nonzero, count_nonzero_flops, count_params, layer_macs
from kdprobe.pruning.l1 import SKIP_PRESETS, l1_keep_indices, l1_plan, l1_prune, parse_remaining, parse_skip, resnet_depth
from kdprobe.pruning.slimming import bn_sparsity_step, prunable_bns, slimming_plan, slimming_prune, slimming_was_trained
from kdprobe.pruning.weight import apply_masks, mask_density, prunable_weights, weight_prune

METHODS = ("l1", "slimming", "weight")

__all__ = [
    "METHODS", "SKIP_PRESETS", "apply_masks", "bn_sparsity_step", "count_flops", "count_nonzero",
    "count_nonzero_flops", "count_params", "l1_keep_indices", "l1_plan", "l1_prune", "layer_macs",
    "mask_density", "parse_remaining", "parse_skip", "prunable_bns", "prunable_weights", "resnet_depth",
    "slimming_plan", "slimming_prune", "slimming_was_trained", "weight_prune",
]
