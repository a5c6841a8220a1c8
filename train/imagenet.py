"""Logit distillation with the Kendall's tau ranking loss on ImageNet (or the embedded demo): the trainer users run.

    python train/imagenet.py                       # the demo: a small teacher on handwritten digits, then a student
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank [--resume auto]

`python train/imagenet.py --help` lists every option. The task (recipes, options, data, models) is
rankkd/tasks/imagenet.py; the trainer every task shares is rankkd/training/trainer.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd.training.trainer import main  # noqa: E402
from rankkd.tasks.imagenet import TASK  # noqa: E402

if __name__ == "__main__":
    main(TASK)
