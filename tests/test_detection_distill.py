"""DetectionDistiller: its loss terms, where their gradients go, and agreement with torchvision's own training."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision")

from rankkd.detection.distill import DetectionDistiller, box_head_logits, roi_logits, teacher_images  # noqa: E402
from rankkd.detection.models import build_detector  # noqa: E402
from rankkd.distill import DistillConfig, distill_losses  # noqa: E402

NUM_CLASSES = 4
SMALL = dict(anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=16, box_head_dim=32, rois_per_image=32,
             rpn_pre_nms_top_n_train=200, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n=50)


def detector(backbone="demo_tiny", seed=0):
    torch.manual_seed(seed)
    return build_detector(backbone, NUM_CLASSES, **SMALL)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 64, 80, generator=generator), torch.rand(3, 72, 64, generator=generator)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [35.0, 20.0, 70.0, 50.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    return images, targets


def grads(module):
    return {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}


def test_terms_sum_to_total_and_are_scalars():
    student, teacher = detector(), detector("demo_small", 1)
    config = DistillConfig(method="dkd", dkd_beta=0.25, temperature=1.0, rank_weight=1.0)
    distiller = DetectionDistiller(student, teacher, config).train()
    images, targets = batch()
    torch.manual_seed(4)
    output, terms = distiller(images, targets, epoch=1.0)
    assert output is None
    assert set(terms) == {"box_reg", "objectness", "rpn_box_reg", "ce", "dkd", "rank", "total"}
    assert all(value.dim() == 0 for value in terms.values())
    parts = sum(value for name, value in terms.items() if name != "total")
    torch.testing.assert_close(terms["total"], parts)
    # The distillation terms are distill_losses over roi_logits' sampled RoIs (the same RNG state samples the same).
    torch.manual_seed(4)
    rois = roi_logits(student, teacher, images, targets)
    labels = torch.cat(rois.labels)
    assert rois.student.shape == rois.teacher.shape == (labels.numel(), NUM_CLASSES)
    assert rois.student.requires_grad and not rois.teacher.requires_grad
    expected = distill_losses(rois.student, rois.teacher, labels, config, epoch=1.0)
    for name in ("ce", "dkd", "rank"):
        torch.testing.assert_close(terms[name], expected[name], msg=name)
    torch.testing.assert_close(terms["objectness"], rois.rpn_losses["loss_objectness"])


def test_distillation_gradients_reach_only_the_student_box_head_and_backbone():
    student, teacher = detector(), detector("demo_small", 1)
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    distiller = DetectionDistiller(student, teacher, DistillConfig(method="kd", temperature=1.0, rank_weight=1.0))
    distiller.train()
    assert not teacher.training
    _, terms = distiller(*batch())
    (terms["kd"] + terms["rank"]).backward()
    student_grads = grads(student)
    reached = {name for name, grad in student_grads.items() if grad is not None and grad.abs().sum() > 0}
    assert any(name.startswith("roi_heads.box_head.") for name in reached)
    assert any(name.startswith("roi_heads.box_predictor.cls_score") for name in reached)
    assert any(name.startswith("backbone.body.") for name in reached)
    assert any(name.startswith("backbone.fpn.") for name in reached)
    assert not any(name.startswith("rpn.") for name in reached)  # proposals are detached
    assert not any(name.startswith("roi_heads.box_predictor.bbox_pred") for name in reached)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    assert not teacher.training


def test_ce_term_is_torchvisions_classification_loss():
    student = detector()
    distiller = DetectionDistiller(student, None, DistillConfig(method="ce", ce_weight=1.0)).train()
    images, targets = batch()
    torch.manual_seed(5)
    _, terms = distiller(images, targets)
    # torchvision's own RoI heads from the same RNG state sample the same proposals; their loss_classifier is
    # F.cross_entropy of the class logits over the sampled labels.
    torch.manual_seed(5)
    losses = student(images, targets)
    torch.testing.assert_close(terms["ce"], losses["loss_classifier"])
    torch.manual_seed(5)
    rois = roi_logits(student, None, images, targets)
    assert rois.teacher is None
    torch.testing.assert_close(terms["ce"], F.cross_entropy(rois.student, torch.cat(rois.labels)))


def test_ce_only_equals_plain_torchvision_training():
    student = detector()
    distiller = DetectionDistiller(student, None, DistillConfig(method="ce", ce_weight=1.0)).train()
    images, targets = batch()
    torch.manual_seed(7)
    _, terms = distiller(images, targets)
    terms["total"].backward()
    ours = grads(student)
    student.zero_grad()
    torch.manual_seed(7)
    losses = student(images, targets)
    sum(losses.values()).backward()
    torch.testing.assert_close(terms["total"], sum(losses.values()))
    for name in ("box_reg", "objectness", "rpn_box_reg"):
        torch.testing.assert_close(terms[name], losses[f"loss_{name}"])
    for name, grad in grads(student).items():
        if grad is None:
            assert ours[name] is None
        else:
            torch.testing.assert_close(ours[name], grad, msg=name)


def test_teacher_logits_come_from_its_own_features_at_the_student_proposals():
    student, teacher = detector().train(), detector("demo_small", 1).eval()
    images, targets = batch()
    torch.manual_seed(3)
    teacher_logits = roi_logits(student, teacher, images, targets).teacher
    # Redo the student's sampling from the same RNG state, then run the teacher's box head by hand.
    torch.manual_seed(3)
    image_list, targets = student.transform(images, targets)
    proposals, _ = student.rpn(image_list, student.backbone(image_list.tensors), targets)
    proposals, *_ = student.roi_heads.select_training_samples(proposals, targets)
    with torch.no_grad():
        expected, _ = box_head_logits(teacher, teacher.backbone(image_list.tensors), proposals,
                                      image_list.image_sizes)
    torch.testing.assert_close(teacher_logits, expected)


def test_without_targets_the_rois_are_the_rpn_proposals():
    student, teacher = detector().eval(), detector("demo_small", 1).eval()
    teacher.transform.image_mean = [0.2, 0.5, 0.4]  # a teacher with its own normalisation
    images, _ = batch()
    rois = roi_logits(student, teacher, images)
    assert rois.labels is None and rois.regression_targets is None and rois.rpn_losses == {}
    with torch.no_grad():
        image_list, _ = student.transform(images)
        features = student.backbone(image_list.tensors)
        proposals, _ = student.rpn(image_list, features)
        expected_student, _ = box_head_logits(student, features, proposals, image_list.image_sizes)
        expected_teacher, _ = box_head_logits(teacher, teacher.backbone(teacher.transform(images)[0].tensors),
                                              proposals, image_list.image_sizes)
    assert rois.student.shape == (sum(len(p) for p in proposals), NUM_CLASSES)
    torch.testing.assert_close(rois.student, expected_student)
    torch.testing.assert_close(rois.teacher, expected_teacher, rtol=1e-4, atol=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match="needs a teacher"):
        DetectionDistiller(detector(), None, DistillConfig(method="kd"))
    other = build_detector("demo_small", NUM_CLASSES, min_size=64, max_size=96, **SMALL)
    with pytest.raises(ValueError, match="resizes or pads differently"):
        DetectionDistiller(detector(), other, DistillConfig(method="kd"))


def test_a_teacher_with_its_own_normalisation_reads_the_students_batch_renormalised():
    student, teacher = detector(), detector("demo_small", 1)
    teacher.transform.image_mean, teacher.transform.image_std = [0.1, 0.6, 0.3], [0.5, 0.25, 2.0]
    images, targets = batch()
    image_list, _ = student.transform(images)
    renormalised = teacher_images(student, teacher, image_list)
    # What the teacher's own transform makes of the images: its normalisation, zero padding (float64 reference).
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in ([0.1, 0.6, 0.3], [0.5, 0.25, 2.0]))
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        expected = torch.zeros(renormalised.shape[1:], dtype=torch.float64)
        expected[:, :height, :width] = (image.double() - mean) / std
        torch.testing.assert_close(renormalised[index].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(renormalised, teacher.transform(images)[0].tensors, rtol=0, atol=1e-5)

    student.train(), teacher.eval()
    torch.manual_seed(3)
    teacher_logits = roi_logits(student, teacher, images, targets).teacher
    torch.manual_seed(3)
    image_list, targets = student.transform(images, targets)
    proposals, _ = student.rpn(image_list, student.backbone(image_list.tensors), targets)
    proposals, *_ = student.roi_heads.select_training_samples(proposals, targets)
    with torch.no_grad():
        own_batch = teacher.transform(images)[0].tensors
        expected, _ = box_head_logits(teacher, teacher.backbone(own_batch), proposals, image_list.image_sizes)
    torch.testing.assert_close(teacher_logits, expected, rtol=1e-4, atol=1e-5)


def test_eval_mode_returns_detections():
    distiller = DetectionDistiller(detector(), detector("demo_small", 1), DistillConfig(method="kd")).eval()
    detections, terms = distiller(batch()[0])
    assert terms == {} and len(detections) == 2 and set(detections[0]) == {"boxes", "labels", "scores"}
