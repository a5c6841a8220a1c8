"""Logit distillation with the Kendall's tau ranking loss on COCO detection (Faster R-CNN FPN), or the embedded demo.

    python train/coco.py                           # the demo: generated shapes in COCO format, teacher then student
    torchrun --nproc_per_node=8 train/coco.py --data /data/coco --pair r101_r18 --teacher-weights TEACHER.pt

`python train/coco.py --help` lists every option. The task (pairs, recipes, data, detectors, evaluation) is
rankkd/tasks/coco.py; the trainer every task shares is rankkd/training/trainer.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd.training.trainer import main  # noqa: E402
from rankkd.tasks.coco import TASK  # noqa: E402

if __name__ == "__main__":
    main(TASK)
