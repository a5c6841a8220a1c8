"""What a task says: only what differs between benchmarks. The run skeleton (rankkd.training.run) does the rest.

A task is an object with
- name, description (the first line of --help), zoo (the module of its model zoo: check_model, build_model, load_teacher), options (the shared options
  of rankkd.training.config plus its own), methods and loss_recipe_prefixes (what --method and --loss offer) and
  recipes (name -> dict of option values, "loss" a rankkd.recipes
  name or a DistillConfig; "demo" and "demo-teacher" run on the embedded demo data);
- recipe(args, name): which recipe a command line starts from, adjusted to it (a pair picks models and loss);
- check(values, env): its own rules over the resolved values (paths, architectures, combinations), raising a
  ValueError that names the option; it may set what depends on the machine (loader workers);
- make_data(cfg, env): loaders (train, val, num_classes, backend) after the rankkd.data protocol;
- make_mixer(cfg, env, data): None, or a callable turning a training batch into (mixed images, soft targets);
- build_student(cfg, num_classes), load_teacher(cfg, weights, num_classes);
- train_forward(student, teacher, cfg): the module whose forward(inputs, targets, epoch) -> (outputs, loss terms)
  is trained (DDP-wrapped by the skeleton); compile(module, mode): how --compile applies to it and to the models;
- evaluate(student, teacher, loader, autocast, env, cfg): the validation metrics of one epoch;
- primary_metric (what "best" means) and summary_metrics: (label, student key, teacher key) per column of the
  summary and of the per-epoch line.

Task below holds what every task shares, ClassificationTask what the image-classification tasks add; a task
overrides what differs.
"""
import torch

from rankkd.models import imagenet as imagenet_zoo
from rankkd.distill import Distiller
from rankkd.training.config import METHOD_NAMES, METHODS_HELP, task_options
from rankkd.training.metrics import evaluate_classifier


class Task:
    """What every task shares: its options after the shared ones' declarations, models from its zoo, no batch mixing,
    torch.compile as it is."""
    zoo = imagenet_zoo
    own_options = ()
    methods, methods_help = METHOD_NAMES, METHODS_HELP  # what --method offers
    loss_recipe_prefixes = ()  # what --loss offers: the rankkd.recipes loss recipes named so

    @property
    def options(self):
        return task_options(self)

    def check_models(self, values):
        for name in (values["student"], values["teacher"]):
            if name is not None:
                self.zoo.check_model(name)

    def make_mixer(self, cfg, env, data):
        return None

    def build_student(self, cfg, num_classes):
        return self.zoo.build_model(cfg.model.student, num_classes)

    def load_teacher(self, cfg, weights, num_classes):
        return self.zoo.load_teacher(cfg.model.teacher, weights, num_classes)

    def compile(self, module, mode):
        return torch.compile(module, mode=mode)


class ClassificationTask(Task):
    """Image classification: the Distiller's forward, top-1 / top-5 and the logits' Kendall tau."""
    primary_metric = "val_top1"
    summary_metrics = (("top-1", "val_top1", "teacher_top1"), ("top-5", "val_top5", "teacher_top5"))

    def train_forward(self, student, teacher, cfg):
        return Distiller(student, teacher if cfg.loss.uses_teacher else None, cfg.loss)

    def evaluate(self, student, teacher, loader, autocast, env, cfg):
        graphs = cfg.speed.compile and cfg.speed.compile_mode == "reduce-overhead"
        return evaluate_classifier(student, teacher, loader, autocast, env, replays_cuda_graphs=graphs)
