"""The tasks the trainer (rankkd.training.trainer) runs: imagenet, cifar100 and coco, one module each, each exporting
TASK; images.py holds what the image tasks share."""
