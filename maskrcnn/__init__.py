"""maskrcnn: Mask R-CNN in plain PyTorch.

Conventions, used everywhere in the package:
- boxes are ``xyxy`` in absolute pixel coordinates (float), no "+1" width;
- image and mask sizes are ``(h, w)``;
- tensors of images are ``3 x H x W`` float RGB in [0, 1];
- labels: 0 is background, ``num_classes`` counts it.
"""

__version__ = "0.1.0"

__all__ = ["build_model", "load_model", "__version__"]


def __getattr__(name):  # keep ``import maskrcnn`` light; the model code loads on first use
    if name == "build_model":
        from maskrcnn.modeling.build import build_model

        return build_model
    if name == "load_model":
        from maskrcnn.weights import load_model

        return load_model
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
