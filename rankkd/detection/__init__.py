"""COCO detection with logit distillation: torchvision Faster R-CNN FPN detectors (models), the distiller of the box
head's class logits (distill), COCO 2017 data with checks and per-rank loaders (data), box AP with pycocotools
(evaluate) and a small generated COCO-format demo set (demo). Needs the `detection` extra (torchvision,
pycocotools); nothing is imported here so that `import rankkd` stays light."""
