"""The training forward of causal-LM distillation: the student's last hidden state and LM head go through the fused
LM-head loss (rankkd.fused_linear_distill_loss) against the teacher's top-K, which comes either from a frozen teacher
run on the same batch (online) or with the batch itself, read from a dump of the teacher's top-K (offline). The
(positions x vocabulary) logits of neither model are ever formed whole."""
import torch

from rankkd.distill import StudentTeacher
from rankkd.fused_linear import FusedLinearDistillLoss, teacher_topk
from rankkd.lm.models import final_hidden, lm_head


class LMDistiller(StudentTeacher):
    """forward(inputs, targets, epoch) -> (None, {"total": loss}) for the run skeleton.

    inputs: {"input_ids": (batch, positions)} and, for offline distillation, "teacher_ids" and "teacher_logits"
    (batch, positions, K); targets: the next token at each position, ignore_index where the loss does not count (a
    document boundary). Without a teacher and without offline top-K (method ce), the loss is the cross-entropy alone.
    """

    def __init__(self, student, teacher, loss: FusedLinearDistillLoss, top_k: int, chunk_size: int = 1024):
        super().__init__(student, teacher)
        self.loss, self.top_k, self.chunk_size = loss, top_k, chunk_size

    def teacher_topk(self, input_ids):
        """The frozen teacher's top-K token ids and logits at every position of `input_ids`."""
        with torch.no_grad():
            weight, bias = lm_head(self.teacher)
            return teacher_topk(final_hidden(self.teacher, input_ids), weight, self.top_k, bias=bias,
                                chunk_size=self.chunk_size)

    def forward(self, inputs, targets, epoch=None):
        input_ids = inputs["input_ids"]
        if "teacher_ids" in inputs:
            teacher_ids, teacher_logits = inputs["teacher_ids"], inputs["teacher_logits"]
        elif self.teacher is not None:
            teacher_ids, teacher_logits = self.teacher_topk(input_ids)
        else:
            # The fused loss always takes a top-K; with its KD and ranking weights at 0 (method ce) these ids carry
            # no weight, and any valid id will do.
            teacher_ids = targets.clamp(min=0).unsqueeze(-1)
            teacher_logits = torch.zeros(teacher_ids.shape, device=targets.device)
        weight, bias = lm_head(self.student)
        loss = self.loss(final_hidden(self.student, input_ids), weight, targets, bias=bias, teacher_ids=teacher_ids,
                         teacher_logits=teacher_logits)
        # The value checks (ids within the vocabulary, finite teacher logits) cost a host sync on a GPU: the first
        # batch's pass them, and the data that follows comes from the same tokenizer and teacher.
        self.loss.validate = False
        return None, {"total": loss}
