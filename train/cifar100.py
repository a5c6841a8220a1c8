"""Logit distillation with the Kendall's tau ranking loss on CIFAR-100 (mdistiller's pairs), or the embedded demo.

    python train/cifar100.py                       # the demo: handwritten digits at 32x32 through the same path
    python train/cifar100.py --data /data/cifar-100-python --pair res32x4_res8x4 \
        --teacher-weights cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth

`python train/cifar100.py --help` lists every option. The task (pairs, recipes, data, models) is
rankkd/tasks/cifar100.py; the trainer every task shares is rankkd/training/trainer.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd.training.trainer import main  # noqa: E402
from rankkd.tasks.cifar100 import TASK  # noqa: E402

if __name__ == "__main__":
    main(TASK)
