"""RepDistiller's networks (HobbitLong/RepDistiller, `models.model_dict`), named `repdistiller:NAME`.

Every entry of model_dict, lowercased: resnet8 ... resnet110 (aliases of kdprobe's option-B
`resnetXb`, the same network), resnet8x4, resnet32x4, resnet50, wrn_16_1, wrn_16_2, wrn_40_1,
wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19, mobilenetv2, shufflev1, shufflev2. Each has the
reference's state_dict keys and shapes (buffers included) and computes the reference's
function (tested against reference-structured models); `forward` returns logits only.
Written from the reference's structure, not copied from it.
"""
from kdprobe.models.repdistiller import mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401  (importing registers them)
