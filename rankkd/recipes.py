"""The published settings, each once, with its source: loss recipes (LOSS_RECIPES, get_recipe; cifar100_recipe by
pair and method), the teacher -> student pairs of each benchmark, and the published results to compare with.

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

COCO detection (the box head's class logits of Faster R-CNN FPN, background column included)
  coco-dkd                 CE 1 (the Fast R-CNN classification loss), DKD weight 1, α 1, β 0.25, T 1, no warm-up:
                           mdistiller detection/model/config.py (KD.DKD: ALPHA 1.0, BETA 0.25, T 1.0) and rcnn.py,
                           which adds the DKD loss to the detection losses. Published box AP: COCO_PUBLISHED_BOX_AP,
                           each number's source in COCO_PUBLISHED_SOURCES.
  coco-kd                  CE 1, KD 1, T 1: mdistiller's detection code has no KD config; these weights follow its
                           DKD setup and are this project's choice, not a published recipe.
Schedules of the COCO task (COCO_SCHEDULES): detectron2's 1x and 3x at mdistiller's batch of 8.
"""
import dataclasses

from rankkd.distill import DistillConfig

# mdistiller's CIFAR-100 teacher -> student pairs, by the stems of its configs/cifar100/dkd/*.yaml.
CIFAR100_PAIRS = {
    "res56_res20": ("resnet56", "resnet20"),
    "res110_res32": ("resnet110", "resnet32"),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
    "res32x4_shuv1": ("resnet32x4", "ShuffleV1"),
    "res32x4_shuv2": ("resnet32x4", "ShuffleV2"),
    "wrn40_2_shuv1": ("wrn_40_2", "ShuffleV1"),
    "vgg13_mv2": ("vgg13", "MobileNetV2"),
    "res50_mv2": ("ResNet50", "MobileNetV2"),
}
# DKD.BETA of each of those configs; the ones that set none use mdistiller's default 8.0.
CIFAR100_DKD_BETA = {pair: 8.0 for pair in CIFAR100_PAIRS} | {
    "res56_res20": 2.0, "res110_res32": 2.0,
    "wrn40_2_wrn_16_2": 6.0, "wrn40_2_wrn_40_1": 6.0, "vgg13_vgg8": 6.0, "vgg13_mv2": 6.0,
}
# Top-1 (%) that mdistiller's README publishes for its KD and DKD runs of each pair (240 epochs, no ranking loss):
# the baselines the ranking paper reports its gains over, every number as CIFAR100_PUBLISHED_SOURCE gives it. Its DKD
# table labels res32x4_shuv2's student MobileNet-V2; the config stem, its other tables and the DKD paper say
# ShuffleNet-V2.
CIFAR100_PUBLISHED_TOP1 = {
    "res56_res20": {"kd": 70.66, "dkd": 71.97}, "res110_res32": {"kd": 73.08, "dkd": 74.11},
    "res32x4_res8x4": {"kd": 73.33, "dkd": 76.32}, "wrn40_2_wrn_16_2": {"kd": 74.92, "dkd": 76.23},
    "wrn40_2_wrn_40_1": {"kd": 73.54, "dkd": 74.81}, "vgg13_vgg8": {"kd": 72.98, "dkd": 74.68},
    "res32x4_shuv1": {"kd": 74.07, "dkd": 76.45}, "res32x4_shuv2": {"kd": 74.45, "dkd": 77.07},
    "wrn40_2_shuv1": {"kd": 74.83, "dkd": 76.70}, "vgg13_mv2": {"kd": 67.37, "dkd": 69.71},
    "res50_mv2": {"kd": 67.35, "dkd": 70.35},
}
CIFAR100_PUBLISHED_SOURCE = ("mdistiller README.md (github.com/megvii-research/mdistiller), the KD and DKD rows of "
                             "its 'Decoupled Knowledge Distillation' CIFAR-100 tables")

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
    "coco-kd": DistillConfig(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=1.0),
    "coco-dkd": DistillConfig(method="dkd", ce_weight=1.0, kd_weight=1.0, temperature=1.0, dkd_alpha=1.0,
                              dkd_beta=0.25),
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


# COCO detection (Faster R-CNN FPN): teacher -> student backbones of mdistiller's detection configs
# (detection/configs/DKD/DKD-R18-R101.yaml, DKD-R50-R101.yaml, DKD-MV2-R50.yaml), plus the CPU demo's pair.
COCO_PAIRS = {
    "r101_r18": ("resnet101", "resnet18"),
    "r101_r50": ("resnet101", "resnet50"),
    "r50_mv2": ("resnet50", "mobilenet_v2"),
    "demo": ("demo_small", "demo_tiny"),
}
# Box AP on COCO val2017 in the DKD paper's COCO table (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022;
# Faster R-CNN FPN, detectron2's 1x schedule as mdistiller trains it): teacher, student alone, KD, DKD.
COCO_PUBLISHED_BOX_AP = {
    "r101_r18": {"teacher": 42.04, "student": 33.26, "kd": 33.97, "dkd": 35.05},
    "r101_r50": {"teacher": 42.04, "student": 37.93, "kd": 38.35, "dkd": 39.25},
    "r50_mv2": {"teacher": 40.22, "student": 29.47, "kd": 30.13, "dkd": 32.34},
}
# The file each of those numbers can be checked in, or "unverified": quoted secondhand from the DKD paper, whose table
# was not read here. The teachers are detectron2's model-zoo detectors (mdistiller's teacher weights come from them)
# and the R-50 student alone matches the zoo's R50-FPN 1x; MODEL_ZOO.md gives their box AP to one decimal.
_DETECTRON2_ZOO = "detectron2 MODEL_ZOO.md, COCO Faster R-CNN table: "
_R101_FPN_3X = _DETECTRON2_ZOO + "R101-FPN 3x (faster_rcnn_R_101_FPN_3x, model 137851257), 42.0"
_R50_FPN_3X = _DETECTRON2_ZOO + "R50-FPN 3x (faster_rcnn_R_50_FPN_3x, model 137849458), 40.2"
_R50_FPN_1X = _DETECTRON2_ZOO + "R50-FPN 1x (faster_rcnn_R_50_FPN_1x, model 137257794), 37.9"
_UNVERIFIED = {"student": "unverified", "kd": "unverified", "dkd": "unverified"}
COCO_PUBLISHED_SOURCES = {
    "r101_r18": {**_UNVERIFIED, "teacher": _R101_FPN_3X},
    "r101_r50": {**_UNVERIFIED, "teacher": _R101_FPN_3X, "student": _R50_FPN_1X},
    "r50_mv2": {**_UNVERIFIED, "teacher": _R50_FPN_3X},
}
# detectron2's COCO schedules in the COCO task's terms (epochs of iters_per_epoch iterations, lr x0.1 at each
# milestone) at mdistiller's batch of 8, twice the iterations of detectron2's batch of 16: 1x is 90k iterations at
# 16 (steps 60k, 80k) = 180k at 8, how mdistiller trains its students; 3x is 270k at 16 (steps 210k, 250k) = 540k at
# 8, how the zoo's teachers were trained.
COCO_SCHEDULES = {
    "1x": {"epochs": 36, "iters_per_epoch": 5000, "milestones": (24, 32)},
    "3x": {"epochs": 108, "iters_per_epoch": 5000, "milestones": (84, 100)},
}
