"""Pruning surgery: L1 filter pruning, Network Slimming, weight-level masks, and size counts.

Structured methods (l1_prune, slimming_prune) return a NEW, physically smaller model built
through `create_model`, whose `.arch` kwargs carry the pruned widths, so a checkpoint of it
rebuilds without the original. Weight-level pruning zeroes weights in place and returns
bool masks keyed by state_dict name, which the training loop re-applies after each step.
`prune_checkpoint` (ops.py) does it file to file, recording what was done in the checkpoint.
"""
from kdprobe.pruning.flops import count_flops, count_nonzero, count_nonzero_flops, count_params, layer_macs
from kdprobe.pruning.l1 import SKIP_PRESETS, l1_keep_indices, l1_plan, l1_prune, parse_remaining, parse_skip, resnet_depth
from kdprobe.pruning.slimming import bn_sparsity_step, prunable_bns, slimming_plan, slimming_prune, slimming_was_trained
from kdprobe.pruning.weight import apply_masks, mask_density, prunable_weights, weight_prune
from kdprobe.pruning.ops import METHODS, SIZE_LABELS, PruneReport, check_prune_args, prune_checkpoint, sizes

__all__ = [
    "METHODS", "SIZE_LABELS", "SKIP_PRESETS", "PruneReport", "apply_masks", "bn_sparsity_step", "check_prune_args",
    "count_flops", "count_nonzero",
    "count_nonzero_flops", "count_params", "l1_keep_indices", "l1_plan", "l1_prune", "layer_macs",
    "mask_density", "parse_remaining", "parse_skip", "prunable_bns", "prunable_weights", "resnet_depth",
    "prune_checkpoint", "sizes", "slimming_plan", "slimming_prune", "slimming_was_trained", "weight_prune",
]
