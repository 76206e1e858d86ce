"""Architectures of the rethinking-network-pruning code (Liu et al. 2019), named by source.

rnp-l1:resnetXX           l1-norm-pruning's ResNet: an alias of kdprobe's resnetXXa (models.resnet)
rnp-slimming:vgg19        network-slimming's VGG-19 (keys feature.N)            (rnp.vgg)
rnp-slimming:preresnet164 network-slimming's pre-activation bottleneck ResNet  (rnp.preresnet)
rnp-slimming:densenet40   network-slimming's DenseNet-40 with channel selection (rnp.densenet)
rnp-weight:resnet56/110   weight-level's bottleneck CIFAR ResNet                (rnp.weight_resnet)
"""
from kdprobe.models.rnp import densenet, preresnet, vgg, weight_resnet  # noqa: F401  (importing registers them)
