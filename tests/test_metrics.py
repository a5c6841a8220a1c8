import math

import pytest
import torch

from rankkd.training.metrics import kendall_tau, topk_correct


def kendall_tau_b_loop(x, y):
    """Kendall tau-b of two sequences by the definition, in float64, O(n^2)."""
    concordant_minus_discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            ties_x += dx == 0
            ties_y += dy == 0
            concordant_minus_discordant += (dx > 0) - (dx < 0) if dy > 0 else ((dx < 0) - (dx > 0) if dy < 0 else 0)
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return concordant_minus_discordant / denominator if denominator else math.nan


@pytest.mark.parametrize("classes", [2, 7, 100])
def test_kendall_tau_matches_definition_with_ties(classes):
    generator = torch.Generator().manual_seed(classes)
    # Rounded logits so ties occur in both rankings.
    student = (torch.randn(5, classes, generator=generator) * 2).round()
    teacher = (student + torch.randn(5, classes, generator=generator)).round()
    got = kendall_tau(student, teacher)
    want = [kendall_tau_b_loop(s.tolist(), t.tolist()) for s, t in zip(student.double(), teacher.double())]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0,
                               equal_nan=True)


def test_kendall_tau_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(9, 1000, generator=generator)
    teacher = student + torch.randn(9, 1000, generator=generator)
    teacher[0, :500] = 0.0  # many ties in one row
    got = kendall_tau(student, teacher, max_pairs_per_chunk=3_000_000)  # several chunks
    want = [scipy_stats.kendalltau(s.numpy(), t.numpy()).statistic for s, t in zip(student, teacher)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)


def test_kendall_tau_edge_cases():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert kendall_tau(x, x).item() == pytest.approx(1.0)
    assert kendall_tau(x, -x).item() == pytest.approx(-1.0)
    assert kendall_tau(x, torch.ones_like(x)).isnan().all()  # a constant ranking has no tau
    assert kendall_tau(x, torch.tensor([[1.0, float("nan"), 3.0, 4.0]])).isnan().all()
    assert kendall_tau(x.bfloat16(), x.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="one shape"):
        kendall_tau(x, x[:, :3])


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    assert topk_correct(logits, target, ks=(1, 2, 5)).tolist() == [1, 2, 3]
