"""maskrcnn: Mask R-CNN in plain PyTorch.

Conventions, used everywhere in the package:
- boxes are ``xyxy`` in absolute pixel coordinates (float), no "+1" width;
- image and mask sizes are ``(h, w)``;
- tensors of images are ``3 x H x W`` float RGB in [0, 1].
"""

__version__ = "0.1.0"
