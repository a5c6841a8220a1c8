"""Detectors (rankkd.detection.models): detectron2's settings, frozen parts, weights from files, teacher loading."""
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from rankkd.recipes import COCO_PAIRS as PAIRS  # noqa: E402
from rankkd.recipes import COCO_PUBLISHED_BOX_AP as PUBLISHED_BOX_AP  # noqa: E402
from rankkd.detection.models import (BACKBONES, COCO_CATEGORY_IDS,  # noqa: E402
                                     build_detector, load_detection_teacher)

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
    assert all(t in BACKBONES and s in BACKBONES for t, s in PAIRS.values())
    assert set(PUBLISHED_BOX_AP) == set(PAIRS) - {"demo"}
    assert PUBLISHED_BOX_AP["r101_r18"]["dkd"] == 35.05
    assert len(COCO_CATEGORY_IDS) == 80


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
    from rankkd.detection.demo import DEMO_DETECTOR

    torch.manual_seed(0)
    model = build_detector("demo_tiny", 4, **DEMO_DETECTOR).train()
    losses = model([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]),
                                                "labels": torch.tensor([2])}])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
