"""rankkd.losses against independent float64 computations (numpy, explicit probabilities, worked examples), plus the
properties the papers state and the argument checks."""
import math

import numpy as np
import pytest
import torch

import rankkd
from conftest import logits
from rankkd import losses


def softmax_np(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl_np(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def kd_numpy(student, teacher, temperature):
    s, t = student.detach().numpy(), teacher.detach().numpy()
    return np.mean([kl_np(softmax_np(t[i] / temperature), softmax_np(s[i] / temperature))
                    for i in range(len(s))]) * temperature**2


def dkd_parts_numpy(student, teacher, target, temperature):
    """Per row: TCKD on the binary [p_target, 1 - p_target] and NCKD on the renormalized non-target probabilities."""
    s, t, y = student.detach().numpy(), teacher.detach().numpy(), target.numpy()
    tckd, nckd = [], []
    for i in range(len(s)):
        p_s, p_t = softmax_np(s[i] / temperature), softmax_np(t[i] / temperature)
        b_s = np.array([p_s[y[i]], 1 - p_s[y[i]]])
        b_t = np.array([p_t[y[i]], 1 - p_t[y[i]]])
        rest = np.arange(len(p_s)) != y[i]
        tckd.append(kl_np(b_t, b_s))
        nckd.append(kl_np(p_t[rest] / p_t[rest].sum(), p_s[rest] / p_s[rest].sum()))
    return np.array(tckd), np.array(nckd)


def pearson_np(a, b, eps=1e-8):
    """Pearson correlation as DIST's code writes it: 1e-8 added to the product of the centered norms."""
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b) + eps))


def dist_numpy(student, teacher, beta, gamma, temperature):
    p_s = softmax_np(student.detach().numpy() / temperature)
    p_t = softmax_np(teacher.detach().numpy() / temperature)
    inter = 1 - np.mean([pearson_np(p_s[i], p_t[i]) for i in range(p_s.shape[0])])
    intra = 1 - np.mean([pearson_np(p_s[:, c], p_t[:, c]) for c in range(p_s.shape[1])])
    return (beta * inter + gamma * intra) * temperature**2


# ---- KD ----

def test_kd_worked_example():
    # T = 2: teacher softmax([2 ln 3, 0] / 2) = [3/4, 1/4], student softmax([0, 0]) = [1/2, 1/2].
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[2 * math.log(3), 0.0]], dtype=torch.float64)
    expected = (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)) * 4
    assert losses.kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_numpy_and_gradient_formula(temperature):
    student, teacher = logits(6, 11, requires_grad=True), logits(6, 11)
    loss = losses.kd_loss(student, teacher, temperature=temperature)
    assert loss.item() == pytest.approx(kd_numpy(student, teacher, temperature), rel=1e-10)
    loss.backward()
    # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t), averaged over the batch.
    p_s = torch.softmax(student.detach() / temperature, -1)
    p_t = torch.softmax(teacher / temperature, -1)
    torch.testing.assert_close(student.grad, temperature * (p_s - p_t) / 6, rtol=1e-10, atol=1e-12)


def test_kd_is_zero_when_student_equals_teacher():
    z = logits(5, 30, dtype=torch.float32)
    for standardize in (False, True):
        assert losses.kd_loss(z, z.clone(), temperature=3.0, standardize=standardize).item() == pytest.approx(
            0.0, abs=1e-6)


def test_kd_teacher_gradient_when_asked():
    student, teacher = logits(4, 7), logits(4, 7, requires_grad=True)
    torch.autograd.gradcheck(lambda t: losses.kd_loss(student, t, temperature=2.0), (teacher,))


# ---- logit standardization ----

def test_standardize_matches_numpy():
    z = logits(4, 9)
    x = z.numpy()
    expected = (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(losses.standardize(z).numpy(), expected, rtol=1e-12)
    assert losses.standardize(z.to(torch.bfloat16)).dtype == torch.float32


def test_standardized_kd_matches_numpy_and_gradcheck():
    student, teacher = logits(5, 8, requires_grad=True), logits(5, 8)
    z = [x.detach().numpy() for x in (student, teacher)]
    z = [torch.from_numpy((x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-7)) for x in z]
    expected = kd_numpy(*z, 2.0)
    assert losses.kd_loss(student, teacher, temperature=2.0, standardize=True).item() == pytest.approx(expected,
                                                                                                       rel=1e-10)
    torch.autograd.gradcheck(lambda s: losses.kd_loss(s, teacher, temperature=2.0, standardize=True), (student,))


def test_standardized_kd_invariant_to_row_shift_and_positive_scale():
    student, teacher = logits(6, 20), logits(6, 20)
    base = losses.kd_loss(student, teacher, temperature=2.0, standardize=True)
    shift = 10 * torch.randn(6, 1, dtype=torch.float64)
    scale = torch.rand(6, 1, dtype=torch.float64) * 5 + 0.2
    for s, t in ((student * scale + shift, teacher), (student, teacher * scale - shift),
                 (student * scale, teacher * scale.flip(0) + shift)):
        moved = losses.kd_loss(s, t, temperature=2.0, standardize=True)
        assert moved.item() == pytest.approx(base.item(), rel=1e-5)
    assert losses.kd_loss(student * 3, teacher, temperature=2.0).item() != pytest.approx(
        losses.kd_loss(student, teacher, temperature=2.0).item(), rel=1e-3)  # without it, scale matters


# ---- DKD ----

@pytest.mark.parametrize("temperature,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0)])
def test_dkd_matches_numpy(temperature, alpha, beta):
    student, teacher = logits(7, 10), logits(7, 10)
    target = torch.randint(0, 10, (7,))
    tckd, nckd = dkd_parts_numpy(student, teacher, target, temperature)
    expected = np.mean(alpha * tckd + beta * nckd) * temperature**2
    loss = losses.dkd_loss(student, teacher, target, alpha=alpha, beta=beta, temperature=temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    got_tckd, got_nckd = losses.dkd_parts(student, teacher, target, temperature=temperature)
    np.testing.assert_allclose(got_tckd.numpy(), tckd, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(got_nckd.numpy(), nckd, rtol=1e-9, atol=1e-14)


def test_dkd_gradcheck():
    student, teacher = logits(4, 6, requires_grad=True), logits(4, 6)
    target = torch.randint(0, 6, (4,))
    torch.autograd.gradcheck(lambda s: losses.dkd_loss(s, teacher, target, alpha=0.7, beta=3.0, temperature=2.0),
                             (student,))
    torch.autograd.gradcheck(lambda s: losses.dkd_loss(s, teacher, target, temperature=2.0, standardize=True),
                             (student,))


def test_dkd_parts_sum_to_kd_as_the_paper_defines():
    # DKD paper, Eq. (1): KD = TCKD + (1 - p_target^teacher) * NCKD, per sample.
    student, teacher = logits(9, 15), logits(9, 15)
    target = torch.randint(0, 15, (9,))
    temperature = 3.0
    tckd, nckd = losses.dkd_parts(student, teacher, target, temperature=temperature)
    p_teacher_target = torch.softmax(teacher / temperature, -1).gather(-1, target[:, None]).squeeze(-1)
    per_row_kd = tckd + (1 - p_teacher_target) * nckd
    assert (per_row_kd.mean() * temperature**2).item() == pytest.approx(
        losses.kd_loss(student, teacher, temperature=temperature).item(), rel=1e-10)


def test_dkd_stays_finite_for_a_confident_teacher():
    student, teacher = logits(3, 5, dtype=torch.float32, requires_grad=True), logits(3, 5, dtype=torch.float32)
    target = torch.tensor([0, 1, 2])
    teacher[torch.arange(3), target] = 200.0  # p_target == 1 in float32, 1 - p_target underflows
    loss = losses.dkd_loss(student, teacher, target, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


# ---- DIST ----

@pytest.mark.parametrize("beta,gamma,temperature", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_numpy(beta, gamma, temperature):
    student, teacher = logits(8, 12), logits(8, 12)
    expected = dist_numpy(student, teacher, beta, gamma, temperature)
    got = losses.dist_loss(student, teacher, beta=beta, gamma=gamma, temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # numpy's own Pearson (np.corrcoef, no 1e-8) agrees on the inter-class part.
    p_s, p_t = softmax_np(student.numpy() / temperature), softmax_np(teacher.numpy() / temperature)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(p_s, p_t)])
    inter_only = losses.dist_loss(student, teacher, beta=beta, gamma=0.0, temperature=temperature)
    assert inter_only.item() == pytest.approx(beta * inter * temperature**2, rel=1e-4)


def test_dist_gradcheck_and_zero_at_teacher():
    student, teacher = logits(5, 6, scale=1.0, requires_grad=True), logits(5, 6, scale=1.0)
    torch.autograd.gradcheck(lambda s: losses.dist_loss(s, teacher, beta=1.5, gamma=0.5, temperature=2.0), (student,))
    # Not exactly 0: each correlation is |a|^2 / (|a|^2 + 1e-8) with |a|^2 as small as ~1e-3 for probabilities.
    assert losses.dist_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-4)


# ---- ranking loss, as re-exported ----

def test_rank_loss_is_the_op_and_invariant_to_row_shift():
    assert losses.kendall_rank_loss is rankkd.kendall_rank_loss
    student, teacher = logits(6, 25, dtype=torch.float32), logits(6, 25, dtype=torch.float32)
    base = losses.kendall_rank_loss(student, teacher)
    shifted = losses.kendall_rank_loss(student + 50 * torch.randn(6, 1), teacher - 50 * torch.randn(6, 1))
    assert shifted.item() == pytest.approx(base.item(), rel=1e-4)


# ---- dtypes ----

def test_bfloat16_logits_are_computed_in_float32():
    student, teacher = logits(4, 10, dtype=torch.bfloat16), logits(4, 10, dtype=torch.bfloat16)
    target = torch.randint(0, 10, (4,))
    for loss_fn, args in ((losses.kd_loss, ()), (losses.dkd_loss, (target,)), (losses.dist_loss, ())):
        low = loss_fn(student, teacher, *args)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(loss_fn(student.double(), teacher.double(), *args).item(), rel=1e-5)


# ---- bad input ----

def test_bad_logits_name_the_argument():
    student, teacher = logits(4, 10), logits(4, 10)
    target = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="classes"):
        losses.kd_loss(student, logits(4, 11))
    with pytest.raises(TypeError, match="student"):
        losses.kd_loss(torch.randint(0, 5, (4, 10)), teacher)
    with pytest.raises(TypeError, match="teacher"):
        losses.dkd_loss(student, teacher.long(), target)
    with pytest.raises(ValueError, match="student"):
        losses.dist_loss(student[0], teacher)
    with pytest.raises(ValueError, match="temperature"):
        losses.kd_loss(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        losses.dkd_loss(student, teacher, target, beta=-1.0)


def test_bad_targets_name_the_argument():
    student, teacher = logits(4, 10), logits(4, 10)
    with pytest.raises(ValueError, match="target.*shape"):
        losses.dkd_loss(student, teacher, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="target.*shape"):
        losses.dkd_loss(student, teacher, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="target"):
        losses.dkd_loss(student, teacher, torch.zeros(4))
    for bad in (10, -1):
        with pytest.raises(ValueError, match=r"target.*\[0, 10\)"):
            losses.dkd_loss(student, teacher, torch.tensor([0, 1, bad, 2]))


# ---- torch.compile ----

def test_losses_compile_without_graph_breaks():
    torch._dynamo.reset()
    student, teacher = logits(4, 10, dtype=torch.float32, requires_grad=True), logits(4, 10, dtype=torch.float32)
    target = torch.randint(0, 10, (4,))

    def all_losses(s, t, y):
        return (losses.kd_loss(s, t, temperature=4.0, standardize=True) + losses.dkd_loss(s, t, y)
                + losses.dist_loss(s, t) + losses.kendall_rank_loss(s, t))

    compiled = torch.compile(all_losses, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(student, teacher, target), all_losses(student, teacher, target))
