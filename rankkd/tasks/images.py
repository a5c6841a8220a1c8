"""What the image tasks share (ImageTask: models from a zoo, batches of images in the channels_last layout, throughput
in images), and what the image-classification tasks add (ClassificationTask: the Distiller's forward, top-1 / top-5
and the logits' Kendall tau)."""
import abc
from types import ModuleType

import torch

from rankkd.distill import Distiller
from rankkd.training.config import Option
from rankkd.training.metrics import evaluate_classifier
from rankkd.training.task import Task, TaskData

# Options of every image task: each one's option table includes them.
IMAGE_OPTIONS = (
    Option("channels_last", "speed", type=bool, default=True, identity=False, group="run",
           help="NHWC memory format (default on)"),
)


def task_data(loaders):
    """The TaskData of rankkd.data's DataLoaders."""
    return TaskData(train=loaders.train, val=loaders.val, num_classes=loaders.num_classes, backend=loaders.backend)


class ImageTask(Task):
    """Models from the zoo module, batches of images (a batch's length is its image count), and models laid out as
    --channels-last says (IMAGE_OPTIONS)."""

    unit = "img"

    @property
    @abc.abstractmethod
    def zoo(self) -> ModuleType:
        """The module of its model zoo: check_model(name), build_model(name, num_classes, ...), load_teacher(name,
        weights, num_classes)."""

    def check_models(self, values):
        for name in (values["student"], values["teacher"]):
            if name is not None:
                self.zoo.check_model(name)

    def build_student(self, cfg, num_classes):
        return self.zoo.build_model(cfg.model.student, num_classes)

    def load_teacher(self, cfg, weights, num_classes):
        return self.zoo.load_teacher(cfg.model.teacher, weights, num_classes)

    def place_model(self, model, cfg, device):
        layout = torch.channels_last if cfg.speed.channels_last else torch.contiguous_format
        return model.to(device, memory_format=layout)

    def batch_units(self, inputs, targets):
        return len(inputs)


class ClassificationTask(ImageTask):
    """Image classification: the Distiller's forward, top-1 / top-5 and the logits' Kendall tau."""

    primary_metric = "val_top1"
    summary_metrics = (("top-1", "val_top1", "teacher_top1"), ("top-5", "val_top5", "teacher_top5"))

    def train_forward(self, student, teacher, cfg):
        return Distiller(student, teacher if cfg.loss.uses_teacher else None, cfg.loss)

    def evaluate(self, student, teacher, loader, autocast, env, cfg):
        graphs = cfg.speed.compile and cfg.speed.compile_mode == "reduce-overhead"
        return evaluate_classifier(student, teacher, loader, autocast, env, replays_cuda_graphs=graphs)
