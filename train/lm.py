"""Language-model distillation with the fused LM-head loss (CE + KD over the teacher's top-K + the Kendall ranking
loss over it), or the embedded demo.

    python train/lm.py                             # the demo: the standard library's sources, teacher then student
    torchrun --nproc-per-node 8 train/lm.py --teacher TEACHER_FOLDER --student STUDENT_FOLDER --data corpus.jsonl
    python train/lm.py --teacher TEACHER_FOLDER --student STUDENT_FOLDER --data corpus.jsonl --dump-teacher-topk DIR
    torchrun --nproc-per-node 8 train/lm.py ... --teacher-topk DIR   # trains from the dump, without the teacher

`python train/lm.py --help` lists every option. The task (recipes, data, models, evaluation, the dump) is
rankkd/tasks/lm.py; the trainer every task shares is rankkd/training/trainer.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd.tasks.lm import main  # noqa: E402

if __name__ == "__main__":
    main()
