"""The ImageNet channel statistics both loaders normalize with (RGB, for pixel values in [0, 1])."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
