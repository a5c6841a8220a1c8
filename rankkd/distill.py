"""Plug-and-play distillation: any logit distillation loss, plus the Kendall ranking loss with one argument.

    total = ce_weight * CE + kd_weight * L_base + rank_weight * L_rank    (the paper's α·CE + β·L_base + γ·L_RK)

L_base is KD, DKD (with its warm-up) or DIST, or nothing (method "ce"); KD and DKD can z-score the logits first
(logit standardization). rank_weight > 0 switches the ranking loss on, over any of them. The paper sets γ = α (the
CE weight) unless it says otherwise.

Recipes (LOSS_RECIPES, get_recipe; cifar100_recipe by pair and method) carry the published loss settings. Each base
recipe <name> has a twin <name>-rank: the same plus the ranking loss at γ = α (the CE weight), except
deit-kd-rank: γ = 0.5 as the ranking paper sets for DeiT students. Ranking-loss options are the DistillConfig
defaults (k 1, teacher_mode "tanh", all classes, precision "fast"). "Published" below is the top-1 (%) the
source reports for that setting; these recipes fix the loss only (optimizer, schedule and data are the trainer's).

mdistiller = github.com/megvii-research/mdistiller (the DKD authors' code, whose baselines the ranking paper uses).

ImageNet
  imagenet-kd              CE 0.5, KD 0.5, T 1: mdistiller configs/imagenet/r34_r18/kd.yaml and r50_mv1/kd.yaml.
                           Published (mdistiller README): R34 -> R18 71.03, R50 -> MobileNetV1 70.50.
  imagenet-dkd-r34-r18     CE 1, α 1, β 0.5, T 1, warm-up 1 epoch: mdistiller configs/imagenet/r34_r18/dkd.yaml
                           (α is the default DKD.ALPHA 1.0 of mdistiller/engine/cfg.py). Published: 71.70.
                           mdistiller counts epochs from 1, so its WARMUP 1 gives the full DKD weight from the first
                           step: pass epoch_index + 1 to distill_losses to reproduce that exactly.
  imagenet-dkd-r50-mv1     as above with β 2.0: mdistiller configs/imagenet/r50_mv1/dkd.yaml. Published: 72.05.
  imagenet-dist            CE 1, weight 2 on DIST with β 1 (inter-class), γ 1 (intra-class), τ 1. The DIST authors'
                           loss wrapper (hunto/image_classification_sota lib/models/losses/kd_loss.py) computes
                           ori_loss_weight * CE + kd_loss_weight * DIST(beta=1, gamma=1, tau), so "weight 2" is
                           kd_weight 2 here, i.e. effective inter and intra weights of 2 each; mmrazor's
                           configs/distill/mmcls/dist/dist_logits_resnet34_resnet18_8xb32_in1k.py states the same
                           numbers (DISTLoss beta 1, gamma 1, tau 1, loss_weight 2). Published (hunto/DIST_KD README,
                           "baseline settings"): R34 -> R18 72.07, R50 -> MobileNetV1 73.24 (mmrazor's rerun of
                           R34 -> R18: 71.17).
  imagenet-kd-ls           logit standardization on KD: CE 1, KD 6, T 2. Source: Sun et al. (CVPR 2024) code,
                           sunshangquan/logit-standardization-KD: configs/imagenet/r34_r18/kd.yaml sets CE_WEIGHT 1.0
                           (T and KD weight come from the --base-temp / --kd-weight flags), and its published log is
                           logs/imagenet/r34_r18_kd_ours_2_6.txt, named <base temperature>_<KD weight>: 2 and 6.
                           Published: R34 -> R18 71.42 (the best_acc of that log).
  imagenet-dkd-ls-r34-r18, imagenet-dkd-ls-r50-mv1
                           the authors' rule for DKD (tools/train.py with --logit-stand: α and β times the KD weight
                           9, temperature = the base temperature 2) applied to the two mdistiller ImageNet DKD
                           recipes: CE 1, α 9, β 4.5 / 18, T 2, warm-up 1. No published run or config for these.

CIFAR-100 (pairs named by mdistiller's config stems, CIFAR100_PAIRS)
  cifar100-kd              CE 0.1, KD 0.9, T 4: the defaults CFG.KD.* of mdistiller/engine/cfg.py, which
                           configs/cifar100/kd.yaml does not override. Published (mdistiller README), per pair:
                           CIFAR100_PUBLISHED_TOP1[pair]["kd"].
  cifar100-dkd-<pair>      CE 1, α 1, β per pair, T 4, warm-up 20 epochs: mdistiller configs/cifar100/dkd/<pair>.yaml
                           over the defaults CFG.DKD.*; β (CIFAR100_DKD_BETA) is 2.0 for res56_res20 and
                           res110_res32, 6.0 for wrn40_2_wrn_16_2, wrn40_2_wrn_40_1, vgg13_vgg8 and vgg13_mv2, and
                           the default 8.0 for the rest. Published (mdistiller README), per pair:
                           CIFAR100_PUBLISHED_TOP1[pair]["dkd"].
  cifar100-dist            CE 1, weight 2 on DIST(β 1, γ 1), τ 4 (the authors' "dist_t4"; DIST(beta=1, gamma=1,
                           tau=4) in their kd_loss.py). Published (hunto/DIST_KD README, their own CIFAR training
                           code): wrn40_2_wrn_40_1 74.43, res56_res20 71.75, res32x4_res8x4 76.31, res50_mv2 68.66,
                           res32x4_shuv1 76.34, res32x4_shuv2 77.35. Their configs/strategies/distill/dist_cifar.yaml
                           (CE and DIST weights, τ) was not readable from here: weight 2 and τ 4 are unverified.
  cifar100-kd-ls           CE 1, KD 9, T 2, standardized: the logit-standardization fork's CFG.KD.LOSS.CE_WEIGHT 1
                           (changed from mdistiller's 0.1) and its README command --base-temp 2 --kd-weight 9.
                           Published (its README, KD+Ours): res32x4_res8x4 76.62, wrn40_2_wrn_40_1 74.37,
                           wrn40_2_wrn_16_2 76.11, res56_res20 71.43, res110_res32 74.17, res32x4_shuv2 75.56. Its
                           logs name other settings for vgg13_vgg8 74.36 and vgg13_mv2 68.61 (T 3) and res50_mv2 69.02
                           (T 3, KD weight 1): override temperature / kd_weight to follow them.
  cifar100-dkd-ls-<pair>   CE 1, α 9, β 9 x the pair's DKD β, T 2, warm-up 20: the authors' rule for DKD (α and β
                           times --kd-weight 9, temperature --base-temp 2) over mdistiller's DKD config. Published
                           (fork README, DKD+Ours): res32x4_res8x4 77.01, vgg13_vgg8 74.81, wrn40_2_wrn_40_1 74.89,
                           wrn40_2_wrn_16_2 76.39, res56_res20 72.32, res110_res32 74.29, res32x4_shuv2 77.37,
                           vgg13_mv2 69.98, res50_mv2 70.45. Caveats: the fork's tools/train.py as stored computes
                           β from the already-multiplied α (β = 81) and sets KD.TEMPERATURE, which its DKD does not
                           read (DKD keeps T 4); and its DKD log names show other (T, weight) for most pairs
                           (e.g. wrn40_2_wrn_40_1 2,12; res56_res20 3,12 / 3,18; vgg13_vgg8 2,15). The recipe
                           follows the README's stated rule; which setting produced each number is not verified.

DeiT
  deit-kd                  CE 1, KD 1 (α = 1, β = 1): the ranking paper's DeiT setup. Its temperature was not
                           verified; T = 1 follows the ImageNet KD recipe.
"""
import dataclasses
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankkd._args import PRECISIONS, TEACHER_MODES, check_number
from rankkd.losses import check_target, dist_loss, dkd_loss, kd_loss, kendall_rank_loss
from rankkd.ops import BACKENDS

METHODS = ("ce", "kd", "dkd", "dist")


@dataclass
class DistillConfig:
    """Which distillation loss, its weights and options, and the ranking loss on top (rank_weight > 0).

    The field defaults are neutral starting values, not a published setup (e.g. method "dist" by default gets weight
    1 and T 4, which neither DIST config uses): take published settings from LOSS_RECIPES / get_recipe."""
    method: str = "kd"            # "ce" | "kd" | "dkd" | "dist"
    ce_weight: float = 1.0        # α
    kd_weight: float = 1.0        # β: weight of the base loss (KD, DIST; for DKD it multiplies α·TCKD + β·NCKD)
    temperature: float = 4.0      # T of KD, DKD and DIST
    standardize: bool = False     # logit standardization before the softmax (KD and DKD only)
    dkd_alpha: float = 1.0        # DKD: weight of the target-class part TCKD
    dkd_beta: float = 8.0         # DKD: weight of the non-target-class part NCKD
    warmup_epochs: float = 0.0    # DKD: linear warm-up of its term, factor min(epoch / warmup_epochs, 1); 0 = none
    dist_beta: float = 1.0        # DIST: weight of the inter-class relation
    dist_gamma: float = 1.0       # DIST: weight of the intra-class relation
    rank_weight: float = 0.0      # γ; 0 turns the ranking loss off
    rank_k: float = 1.0           # ranking loss: tanh steepness k
    rank_teacher_mode: str = "tanh"
    rank_topk: int | None = None  # ranking loss over the teacher's top-K classes only
    rank_precision: str = "fast"  # "fast": hardware tanh allowed on GPUs; "exact": full float32 math
    rank_backend: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("ce_weight", "kd_weight", "dkd_alpha", "dkd_beta", "warmup_epochs", "dist_beta", "dist_gamma",
                     "rank_weight"):
            check_number(name, getattr(self, name), positive=False)
        for name in ("temperature", "rank_k"):
            check_number(name, getattr(self, name))
        if not isinstance(self.standardize, bool):
            raise ValueError(f"standardize must be True or False, got {self.standardize!r}")
        if self.standardize and self.method not in ("kd", "dkd"):
            raise ValueError(f"standardize applies to methods 'kd' and 'dkd', not {self.method!r}")
        if self.rank_teacher_mode not in TEACHER_MODES:
            raise ValueError(f"rank_teacher_mode must be one of {TEACHER_MODES}, got {self.rank_teacher_mode!r}")
        if self.rank_topk is not None and (isinstance(self.rank_topk, bool) or
                                           not isinstance(self.rank_topk, numbers.Integral) or self.rank_topk < 2):
            raise ValueError(f"rank_topk must be None or an integer >= 2, got {self.rank_topk!r}")
        if self.rank_precision not in PRECISIONS:
            raise ValueError(f"rank_precision must be one of {PRECISIONS}, got {self.rank_precision!r}")
        if self.rank_backend not in BACKENDS:
            raise ValueError(f"rank_backend must be one of {BACKENDS}, got {self.rank_backend!r}")

    @property
    def uses_teacher(self):
        return self.method != "ce" or self.rank_weight > 0


# mdistiller's CIFAR-100 teacher -> student pairs, by the stems of its configs/cifar100/dkd/*.yaml.
CIFAR100_PAIRS = ("res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn_16_2", "wrn40_2_wrn_40_1",
                  "vgg13_vgg8", "res32x4_shuv1", "res32x4_shuv2", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2")
# DKD.BETA of each of those configs; the ones that set none use mdistiller's default 8.0.
CIFAR100_DKD_BETA = {pair: 8.0 for pair in CIFAR100_PAIRS} | {
    "res56_res20": 2.0, "res110_res32": 2.0,
    "wrn40_2_wrn_16_2": 6.0, "wrn40_2_wrn_40_1": 6.0, "vgg13_vgg8": 6.0, "vgg13_mv2": 6.0,
}
# Top-1 (%) that mdistiller's README publishes for its KD and DKD runs of each pair (240 epochs, no ranking loss):
# the baselines the ranking paper reports its gains over. Its DKD table labels res32x4_shuv2's student MobileNet-V2;
# the config stem, its other tables and the DKD paper say ShuffleNet-V2.
CIFAR100_PUBLISHED_TOP1 = {
    "res56_res20": {"kd": 70.66, "dkd": 71.97}, "res110_res32": {"kd": 73.08, "dkd": 74.11},
    "res32x4_res8x4": {"kd": 73.33, "dkd": 76.32}, "wrn40_2_wrn_16_2": {"kd": 74.92, "dkd": 76.23},
    "wrn40_2_wrn_40_1": {"kd": 73.54, "dkd": 74.81}, "vgg13_vgg8": {"kd": 72.98, "dkd": 74.68},
    "res32x4_shuv1": {"kd": 74.07, "dkd": 76.45}, "res32x4_shuv2": {"kd": 74.45, "dkd": 77.07},
    "wrn40_2_shuv1": {"kd": 74.83, "dkd": 76.70}, "vgg13_mv2": {"kd": 67.37, "dkd": 69.71},
    "res50_mv2": {"kd": 67.35, "dkd": 70.35},
}

# Logit standardization's defaults (Sun et al.'s tools/train.py): --kd-weight 9 scales the distillation weights,
# --base-temp 2 replaces the temperature.
STANDARDIZED_WEIGHT = 9.0
STANDARDIZED_TEMPERATURE = 2.0


def _cifar100_dkd(beta):
    return DistillConfig(method="dkd", ce_weight=1.0, temperature=4.0, dkd_alpha=1.0, dkd_beta=beta,
                         warmup_epochs=20.0)


def _standardized_dkd(config):
    """The logit-standardization authors' rule for DKD: α and β times their KD weight, their base temperature."""
    return dataclasses.replace(config, standardize=True, temperature=STANDARDIZED_TEMPERATURE,
                               dkd_alpha=config.dkd_alpha * STANDARDIZED_WEIGHT,
                               dkd_beta=config.dkd_beta * STANDARDIZED_WEIGHT)


def _with_rank(config, rank_weight=None):
    """The recipe plus the ranking loss, γ = α (the CE weight) unless given."""
    return dataclasses.replace(config, rank_weight=config.ce_weight if rank_weight is None else rank_weight)


_IMAGENET_DKD = {
    "r34-r18": DistillConfig(method="dkd", ce_weight=1.0, temperature=1.0, dkd_alpha=1.0, dkd_beta=0.5,
                             warmup_epochs=1.0),
    "r50-mv1": DistillConfig(method="dkd", ce_weight=1.0, temperature=1.0, dkd_alpha=1.0, dkd_beta=2.0,
                             warmup_epochs=1.0),
}
_BASE_RECIPES = {
    "imagenet-kd": DistillConfig(method="kd", ce_weight=0.5, kd_weight=0.5, temperature=1.0),
    **{f"imagenet-dkd-{pair}": config for pair, config in _IMAGENET_DKD.items()},
    "imagenet-dist": DistillConfig(method="dist", ce_weight=1.0, kd_weight=2.0, temperature=1.0, dist_beta=1.0,
                                   dist_gamma=1.0),
    "imagenet-kd-ls": DistillConfig(method="kd", ce_weight=1.0, kd_weight=6.0, temperature=STANDARDIZED_TEMPERATURE,
                                    standardize=True),
    **{f"imagenet-dkd-ls-{pair}": _standardized_dkd(config) for pair, config in _IMAGENET_DKD.items()},
    "cifar100-kd": DistillConfig(method="kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0),
    **{f"cifar100-dkd-{pair}": _cifar100_dkd(beta) for pair, beta in CIFAR100_DKD_BETA.items()},
    "cifar100-dist": DistillConfig(method="dist", ce_weight=1.0, kd_weight=2.0, temperature=4.0, dist_beta=1.0,
                                   dist_gamma=1.0),
    "cifar100-kd-ls": DistillConfig(method="kd", ce_weight=1.0, kd_weight=STANDARDIZED_WEIGHT,
                                    temperature=STANDARDIZED_TEMPERATURE, standardize=True),
    **{f"cifar100-dkd-ls-{pair}": _standardized_dkd(_cifar100_dkd(beta)) for pair, beta in CIFAR100_DKD_BETA.items()},
    "deit-kd": DistillConfig(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=1.0),
}
_RANK_WEIGHT_OVERRIDES = {"deit-kd": 0.5}

LOSS_RECIPES: dict[str, DistillConfig] = {
    **_BASE_RECIPES,
    **{f"{name}-rank": _with_rank(config, _RANK_WEIGHT_OVERRIDES.get(name)) for name, config in _BASE_RECIPES.items()},
}


def get_recipe(name, **overrides):
    """A fresh copy of the named recipe with some fields replaced, e.g. get_recipe("imagenet-kd-rank", rank_k=2.0)."""
    if name not in LOSS_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(LOSS_RECIPES)}")
    fields = [field.name for field in dataclasses.fields(DistillConfig)]
    unknown = [key for key in overrides if key not in fields]
    if unknown:
        raise ValueError(f"unknown DistillConfig field(s) {unknown}; fields: {', '.join(fields)}")
    return dataclasses.replace(LOSS_RECIPES[name], **overrides)


def cifar100_recipe_name(pair, method, *, standardize=False, rank=False):
    """The LOSS_RECIPES name of a CIFAR-100 pair's loss: method "kd", "dkd" or "dist"; standardize for logit
    standardization (KD and DKD); rank for the ranking loss on top. KD and DIST use one recipe for every pair."""
    if pair not in CIFAR100_PAIRS:
        raise ValueError(f"unknown CIFAR-100 pair {pair!r}; pairs (mdistiller's config stems): "
                         f"{', '.join(CIFAR100_PAIRS)}")
    if method not in ("kd", "dkd", "dist"):
        raise ValueError(f"method must be 'kd', 'dkd' or 'dist' for a CIFAR-100 recipe, got {method!r}")
    if standardize and method == "dist":
        raise ValueError("standardize (logit standardization) has recipes for methods 'kd' and 'dkd', not 'dist'")
    name = f"cifar100-{method}" + ("-ls" if standardize else "") + (f"-{pair}" if method == "dkd" else "")
    return name + ("-rank" if rank else "")


def cifar100_recipe(pair, method, *, standardize=False, rank=False, **overrides):
    """The loss recipe of a CIFAR-100 pair, e.g. cifar100_recipe("vgg13_vgg8", "dkd", rank=True): a fresh
    DistillConfig, with `overrides` applied as in get_recipe."""
    return get_recipe(cifar100_recipe_name(pair, method, standardize=standardize, rank=rank), **overrides)


def warmup_factor(epoch, warmup_epochs):
    """min(epoch / warmup_epochs, 1), the DKD warm-up; a 0-d tensor epoch gives a 0-d tensor (no recompilation under
    torch.compile as the epoch changes)."""
    if warmup_epochs == 0:
        return 1.0
    if isinstance(epoch, torch.Tensor):
        return torch.clamp(epoch / warmup_epochs, max=1.0)
    return min(epoch / warmup_epochs, 1.0)


def distill_losses(student_logits, teacher_logits, target, config, epoch=0.0):
    """The loss terms of `config` from logits, for trainers that run the models themselves (e.g. a DDP student).

    student_logits, teacher_logits: (batch, C). The teacher's logits are a fixed target: they are detached here.
    teacher_logits may be None when the config does not use them (method "ce" with rank_weight 0).
    target: (batch,) integer class indices; for methods other than "dkd" also (batch, C) class probabilities
    (mixup / cutmix), used by the CE term only. Out-of-range indices raise on CPU (no check, no host sync, on GPU).
    epoch: epochs done, a float or a 0-d tensor; it only drives the DKD warm-up, min(epoch / warmup_epochs, 1).
    mdistiller calls its warm-up with 1-based integer epochs, so pass epoch_index + 1 to match it exactly, or a
    fractional epoch (epoch_index + step / steps_per_epoch) for a smooth ramp. Under torch.compile pass a 0-d tensor:
    a changing Python float recompiles once.

    Returns {"ce": ..., base method name ("kd" | "dkd" | "dist", absent for "ce"): ..., "rank": ... (when
    rank_weight > 0), "total": ...}: 0-d float32 tensors (float64 for float64 logits). Each term is WEIGHTED, as it
    enters the total (the DKD term includes its warm-up factor), so the terms sum to "total"."""
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        got = student_logits.dtype if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__
        raise TypeError(f"student_logits must be a floating-point torch.Tensor, got {got}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must have shape (batch, C), got {tuple(student_logits.shape)}")
    check_target(target, student_logits, soft_ok=config.method != "dkd")
    if config.uses_teacher:
        if teacher_logits is None:
            raise ValueError(f"teacher_logits are needed by method {config.method!r} with rank_weight "
                             f"{config.rank_weight}, got None")
        teacher_logits = teacher_logits.detach()

    accumulate = torch.promote_types(student_logits.dtype, torch.float32)  # CE of bf16 / fp16 logits in fp32
    hard_target = target if target.is_floating_point() else target.long()
    terms = {"ce": config.ce_weight * F.cross_entropy(student_logits.to(accumulate), hard_target)}
    if config.method == "kd":
        terms["kd"] = config.kd_weight * kd_loss(student_logits, teacher_logits, temperature=config.temperature,
                                                 standardize=config.standardize)
    elif config.method == "dkd":
        dkd = dkd_loss(student_logits, teacher_logits, target, alpha=config.dkd_alpha, beta=config.dkd_beta,
                       temperature=config.temperature, standardize=config.standardize)
        terms["dkd"] = config.kd_weight * warmup_factor(epoch, config.warmup_epochs) * dkd
    elif config.method == "dist":
        terms["dist"] = config.kd_weight * dist_loss(student_logits, teacher_logits, beta=config.dist_beta,
                                                     gamma=config.dist_gamma, temperature=config.temperature)
    if config.rank_weight > 0:
        terms["rank"] = config.rank_weight * kendall_rank_loss(
            student_logits, teacher_logits, k=config.rank_k, teacher_mode=config.rank_teacher_mode,
            topk=config.rank_topk, precision=config.rank_precision, backend=config.rank_backend)
    terms["total"] = sum(terms.values())
    return terms


class Distiller(nn.Module):
    """A student, a frozen teacher and a DistillConfig; forward returns the student logits and the loss terms.

    The teacher is put in eval mode and requires_grad_(False) here, stays in eval mode through train(), and runs
    under no_grad, so it never gets a gradient: build the optimizer from distiller.student.parameters() (an optimizer
    over distiller.parameters() leaves the teacher untouched too, since its parameters never get a .grad). The
    teacher is not run at all when the config does not use it (method "ce" with rank_weight 0), and may then be None.

    forward(images, target, epoch=0.0) -> (student_logits, terms): terms as distill_losses returns them, weighted so
    that they sum to terms["total"]; call terms["total"].backward() and log the rest."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig):
        super().__init__()
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        if teacher is None and config.uses_teacher:
            raise ValueError(f"method {config.method!r} with rank_weight {config.rank_weight} needs a teacher, "
                             "got None")
        self.student = student
        self.teacher = teacher
        self.config = config
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # batch-norm statistics and dropout stay the teacher's own
        return self

    def forward(self, images, target, epoch=0.0):
        student_logits = self.student(images)
        teacher_logits = None
        if self.config.uses_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        return student_logits, distill_losses(student_logits, teacher_logits, target, self.config, epoch)
