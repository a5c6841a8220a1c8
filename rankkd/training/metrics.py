"""Evaluation: top-k accuracy counts, the Kendall tau-b between student and teacher logits, and a classifier's
validation pass."""
import torch

from rankkd.distributed import all_reduce_sum


def topk_correct(logits, target, ks=(1, 5)):
    """How many rows of `logits` (N, C) have their `target` class among the k highest scores, for each k in `ks`.

    Returns an int64 tensor of len(ks) counts on the logits' device (a k larger than C counts every row)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == target.unsqueeze(-1)
    return torch.stack([hits[:, :k].any(dim=-1).sum() for k in ks])


def _pair_signs(x):
    """sign(x_i - x_j) for every ordered pair of each row: (rows, C, C) int8."""
    return (x.unsqueeze(-1) > x.unsqueeze(-2)).to(torch.int8) - (x.unsqueeze(-1) < x.unsqueeze(-2)).to(torch.int8)


@torch.no_grad()
def kendall_tau(student_logits, teacher_logits, *, max_pairs_per_chunk=1 << 24):
    """Kendall's tau-b between the class rankings of the student and the teacher, one value per row of (N, C) logits.

    tau_b = (concordant - discordant) / sqrt((n0 - ties_student) (n0 - ties_teacher)), n0 = C (C - 1) / 2, the same
    statistic as scipy.stats.kendalltau. Exact pair counting, O(C^2) per row, in chunks of rows that hold at most
    `max_pairs_per_chunk` ordered pairs. A row whose student or teacher logits are all equal, or hold a NaN, gives
    NaN."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"kendall_tau takes two (N, C) tensors of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    rows, classes = student_logits.shape
    pairs = classes * (classes - 1) // 2
    chunk = max(1, max_pairs_per_chunk // (classes * classes))
    taus = []
    for start in range(0, rows, chunk):
        student, teacher = student_logits[start:start + chunk].float(), teacher_logits[start:start + chunk].float()
        signs_s, signs_t = _pair_signs(student), _pair_signs(teacher)
        # Ordered pairs count every unordered pair twice, and a row's own diagonal is a tie (i == j) in both.
        score = (signs_s * signs_t).sum(dim=(-1, -2), dtype=torch.int64) // 2
        ties_s = ((signs_s == 0).sum(dim=(-1, -2), dtype=torch.int64) - classes) // 2
        ties_t = ((signs_t == 0).sum(dim=(-1, -2), dtype=torch.int64) - classes) // 2
        tau = score.double() / ((pairs - ties_s).double() * (pairs - ties_t).double()).sqrt()
        has_nan = student.isnan().any(dim=-1) | teacher.isnan().any(dim=-1)
        taus.append(tau.masked_fill(has_nan, float("nan")))
    return torch.cat(taus).float() if taus else student_logits.new_empty((0,), dtype=torch.float32)


@torch.no_grad()
def evaluate_classifier(student, teacher, loader, autocast, env, replays_cuda_graphs=False):
    """Top-1 / top-5 (%) of student and teacher over the whole validation set, and the mean Kendall tau-b between
    their logits. Sums stay per rank until one all-reduce at the end (ranks may run different batch counts)."""
    sums = torch.zeros(7, dtype=torch.float64, device=env.device)
    for images, labels in loader:
        if replays_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each batch replays the graphs anew; its logits are used up
        with autocast():
            student_logits = student(images)
            teacher_logits = teacher(images) if teacher is not None else None
        sums[0] += labels.numel()
        sums[1:3] += topk_correct(student_logits, labels)
        if teacher_logits is not None:
            sums[3:5] += topk_correct(teacher_logits, labels)
            tau = kendall_tau(student_logits, teacher_logits)
            sums[5] += tau.nansum()
            sums[6] += tau.isfinite().sum()
    images, top1, top5, teacher_top1, teacher_top5, tau_sum, tau_rows = all_reduce_sum(sums).tolist()
    has_teacher = teacher is not None
    return {"val_top1": 100 * top1 / images, "val_top5": 100 * top5 / images,
            "val_tau": tau_sum / tau_rows if has_teacher and tau_rows else None,
            "teacher_top1": 100 * teacher_top1 / images if has_teacher else None,
            "teacher_top5": 100 * teacher_top5 / images if has_teacher else None}
