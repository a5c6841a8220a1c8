"""The tasks the run skeleton (rankkd.training.run) trains: imagenet, cifar100 and coco, one module each, each
exporting TASK."""
