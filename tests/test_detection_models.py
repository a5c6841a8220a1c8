"""Detectors (rankkd.detection.models): detectron2's settings, frozen parts, weights from files, teacher loading."""
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from rankkd.recipes import COCO_PAIRS as PAIRS  # noqa: E402
from rankkd.recipes import COCO_PUBLISHED_BOX_AP as PUBLISHED_BOX_AP  # noqa: E402
from rankkd.detection.models import BACKBONES, COCO_CATEGORY_IDS, build_detector  # noqa: E402
from rankkd.detection.teachers import load_detection_teacher  # noqa: E402

SMALL = dict(anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=16, box_head_dim=32, rois_per_image=32)


def test_resnet18_follows_detectron2():
    model = build_detector("resnet18", 81)
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    heads = model.roi_heads
    assert heads.fg_bg_sampler.batch_size_per_image == 512 and heads.fg_bg_sampler.positive_fraction == 0.25
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.05, 0.5, 100)
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert model.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert heads.box_predictor.cls_score.out_features == 81
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    # detectron2 FREEZE_AT 2: stem and res2 frozen, res3-res5 trained.
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for name in ("layer2", "layer3", "layer4") for p in getattr(body, name).parameters())
    assert model.backbone.out_channels == 256


def test_mobilenet_v2_fpn_on_stage_ends():
    model = build_detector("mobilenet_v2", 81)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # mdistiller: FREEZE_AT 0
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())


def test_backbone_weights_from_a_file(tmp_path):
    torch.manual_seed(0)
    classifier = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    model = build_detector("resnet18", 5, backbone_weights=path)
    torch.testing.assert_close(model.backbone.body.layer3[0].conv1.weight, classifier.layer3[0].conv1.weight)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mv2.pth")
    with pytest.raises(ValueError, match="mv2.pth.*not a torchvision resnet18") as info:
        build_detector("resnet18", 5, backbone_weights=tmp_path / "mv2.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="neither a file nor a torchvision weights name"):
        build_detector("resnet18", 5, backbone_weights=tmp_path / "absent.pth")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown detection backbone"):
        build_detector("resnet34", 81)
    with pytest.raises(ValueError, match="demo backbone"):
        build_detector("demo_tiny", 4, backbone_weights="ResNet18_Weights.IMAGENET1K_V1")


def test_pairs_and_published_numbers():
    from rankkd.recipes import COCO_PUBLISHED_SOURCES

    assert all(t in BACKBONES and s in BACKBONES for t, s in PAIRS.values())
    assert set(PUBLISHED_BOX_AP) == set(PAIRS) - {"demo"}
    assert PUBLISHED_BOX_AP["r101_r18"]["dkd"] == 35.05
    assert len(COCO_CATEGORY_IDS) == 80
    # Every published number has a source: a file where it can be checked, or "unverified".
    assert {pair: set(numbers) for pair, numbers in COCO_PUBLISHED_SOURCES.items()} == {
        pair: set(numbers) for pair, numbers in PUBLISHED_BOX_AP.items()}
    sources = {PUBLISHED_BOX_AP[pair][name]: source for pair, numbers in COCO_PUBLISHED_SOURCES.items()
               for name, source in numbers.items() if source != "unverified"}
    assert sources.keys() == {42.04, 40.22, 37.93} and all("MODEL_ZOO.md" in source for source in sources.values())


def test_teacher_recipe_trains_the_pairs_teacher_on_the_3x_schedule():
    from rankkd.training.config import make_parser, resolve_config
    from rankkd.distributed import DistEnv
    from rankkd.tasks.coco import TASK

    def resolve(*argv):
        args = make_parser(TASK).parse_args([*argv, "--data", "synthetic", "--out", "unused"])
        return resolve_config(TASK, args, DistEnv(0, 0, 8, torch.device("cpu")))

    for pair, teacher in (("r101_r18", "resnet101"), ("r50_mv2", "resnet50")):
        cfg = resolve("--recipe", "coco-teacher-3x", "--pair", pair, "--batch-size", "1")
        assert (cfg.model.student, cfg.model.teacher, cfg.loss.method, cfg.loss.rank_weight) == (teacher, None, "ce", 0)
        # detectron2's 3x: 270k iterations at 16 images, x0.1 at 210k and 250k = 540k, 420k, 500k at 8.
        iterations = cfg.data.iters_per_epoch * cfg.optim.global_batch_size / 16  # in iterations of 16 images
        assert (cfg.job.epochs * iterations, tuple(m * iterations for m in cfg.optim.milestones)) == (
            270_000, (210_000, 250_000))
    cfg = resolve("--pair", "r101_r18", "--batch-size", "1")
    iterations = cfg.data.iters_per_epoch * cfg.optim.global_batch_size / 16  # in iterations of 16 images
    assert (cfg.job.epochs * iterations, cfg.model.student) == (90_000, "resnet18")  # 1x, the students'


def test_teacher_from_a_trainer_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = build_detector("demo_small", 4, **SMALL)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {"module." + k: v for k, v in trained.state_dict().items()}, "epoch": 3}, path)
    teacher = load_detection_teacher("demo_small", path, 4, **SMALL)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[name], value)
    teacher.train()  # eval is restored by the distiller; here only check the loaded weights run
    teacher.eval()
    assert len(teacher([torch.rand(3, 48, 64)])) == 1


def test_teacher_of_another_architecture_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"student": build_detector("demo_tiny", 4, **SMALL).state_dict()}, path)
    with pytest.raises(ValueError) as info:
        load_detection_teacher("demo_small", path, 4, **SMALL)
    message = str(info.value)
    assert "\n" not in message and "tiny.pth" in message and "demo_small" in message and "different shape" in message
    with pytest.raises(ValueError, match="81 classes"):
        load_detection_teacher("demo_tiny", path, 81, **SMALL)
    torch.save({"epoch": 1}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth"):
        load_detection_teacher("demo_tiny", tmp_path / "odd.pth", 4, **SMALL)


def test_torchvision_coco_columns_cut_to_contiguous_labels(tmp_path):
    # A torchvision-style 91-column detector (columns = COCO category ids) loads as an 81-column one.
    torch.manual_seed(0)
    coco91 = build_detector("demo_tiny", 91, **SMALL)
    torch.save(coco91.state_dict(), tmp_path / "coco91.pth")
    teacher = load_detection_teacher("demo_tiny", tmp_path / "coco91.pth", 81, **SMALL)
    rows = torch.tensor((0,) + COCO_CATEGORY_IDS)
    predictor, source = teacher.roi_heads.box_predictor, coco91.roi_heads.box_predictor
    torch.testing.assert_close(predictor.cls_score.weight, source.cls_score.weight[rows])
    torch.testing.assert_close(predictor.bbox_pred.bias.view(81, 4), source.bbox_pred.bias.view(91, 4)[rows])


def test_model_side_resizing_only_when_asked():
    image = torch.rand(3, 40, 60)
    model = build_detector("demo_tiny", 4, **SMALL).eval()
    assert model.transform([image])[0].image_sizes == [(40, 60)]
    resizing = build_detector("demo_tiny", 4, min_size=80, max_size=200, **SMALL).eval()
    assert resizing.transform([image])[0].image_sizes == [(80, 120)]


def test_demo_detector_trains_a_step():
    from rankkd.detection.zoo import DEMO_DETECTOR

    torch.manual_seed(0)
    model = build_detector("demo_tiny", 4, **DEMO_DETECTOR).train()
    losses = model([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]),
                                                "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()


def test_detectron2_heads_by_default():
    from torchvision.ops import MultiScaleRoIAlign

    from rankkd.detection.heads import AlignedRoIPooler

    model = build_detector("demo_tiny", 4, **SMALL)
    assert isinstance(model.roi_heads.box_roi_pool, AlignedRoIPooler)
    assert model.rpn.box_loss_beta == model.roi_heads.box_loss_beta == 0.0 and not model.rpn.anchor_generator.rounded
    torchvision_style = build_detector("demo_tiny", 4, head_style="torchvision", **SMALL)
    assert isinstance(torchvision_style.roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert torchvision_style.rpn.box_loss_beta == torchvision_style.roi_heads.box_loss_beta == pytest.approx(1 / 9)
    assert torchvision_style.rpn.anchor_generator.rounded
    with pytest.raises(ValueError, match="head_style must be one of detectron2, torchvision, got 'caffe'"):
        build_detector("demo_tiny", 4, head_style="caffe")


def test_torchvision_style_is_torchvisions_faster_rcnn():
    # The same modules in torchvision's own FasterRCNN: the same losses in training and detections in evaluation.
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    ours = build_detector("demo_tiny", 4, head_style="torchvision", **SMALL)
    reference = FasterRCNN(ours.backbone, None, rpn_anchor_generator=AnchorGenerator(
                               tuple((size,) for size in SMALL["anchor_sizes"]), ((0.5, 1.0, 2.0),) * 5),
                           rpn_head=ours.rpn.head, rpn_post_nms_top_n_train=1000, box_head=ours.roi_heads.box_head,
                           box_predictor=ours.roi_heads.box_predictor, box_batch_size_per_image=32)
    reference.transform = ours.transform
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 77, 101, generator=generator), torch.rand(3, 96, 64, generator=generator)]
    targets = [{"boxes": torch.tensor([[3.5, 4.0, 40.2, 50.9], [50.0, 30.5, 99.0, 70.0]]),
                "labels": torch.tensor([1, 3])}, {"boxes": torch.tensor([[8.0, 9.5, 60.0, 80.0]]),
                                                  "labels": torch.tensor([2])}]
    results = []
    for model in (ours, reference):
        torch.manual_seed(3)
        results.append(model.train()(images, targets))
    torch.testing.assert_close(results[0], results[1])
    detections = [model.eval()(images) for model in (ours, reference)]
    assert sum(len(d["boxes"]) for d in detections[0]) > 0
    torch.testing.assert_close(detections[0], detections[1])


def test_teacher_head_style_follows_its_weights(tmp_path):
    # torchvision's COCO weights (91 category-id columns) were trained with torchvision's heads; others load with
    # detectron2's.
    from torchvision.ops import MultiScaleRoIAlign

    from rankkd.detection.heads import AlignedRoIPooler

    torch.save(build_detector("demo_tiny", 91, **SMALL).state_dict(), tmp_path / "coco91.pth")
    torch.save({"student": build_detector("demo_tiny", 81, **SMALL).state_dict()}, tmp_path / "trained.pth")
    coco91 = load_detection_teacher("demo_tiny", tmp_path / "coco91.pth", 81, **SMALL)
    trained = load_detection_teacher("demo_tiny", tmp_path / "trained.pth", 81, **SMALL)
    assert isinstance(coco91.roi_heads.box_roi_pool, MultiScaleRoIAlign) and coco91.rpn.anchor_generator.rounded
    assert isinstance(trained.roi_heads.box_roi_pool, AlignedRoIPooler) and not trained.rpn.anchor_generator.rounded
