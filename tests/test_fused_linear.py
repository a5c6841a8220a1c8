"""rankkd.fused_linear_distill_loss and rankkd.teacher_topk against an unfused float64 reference: the full logits,
log_softmax, gather and rankkd.reference's ranking loss, with gradients from torch.autograd."""
import json
import pathlib
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import rankkd
from conftest import rel_err
from rankkd import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB, DIM = 101, 24
# Relative error allowed against float64 (docs/design.md): float32 inputs 1e-5 (the ranking loss's exact-math bound;
# softmax and the head's matmuls stay near 1e-6). Half inputs round the logits and their gradient to the input dtype
# around the matmuls, as an LM head in that dtype does: the loss within eps/4, gradients within 2 eps.
FLOAT32_TOL = 1e-5
HALF_TOL = {torch.bfloat16: (2**-9, 2**-6), torch.float16: (2**-12, 2**-9)}  # (loss, gradients)


def reference_loss(hidden, weight, target, teacher_ids, teacher_logits, bias=None, **options):
    """The loss the plain way, in float64: (positions x V) logits, log_softmax, gather, the B x K x K ranking loss."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return reference_loss_of_logits(logits, target, teacher_ids, teacher_logits, **options)


def reference_loss_of_logits(logits, target, teacher_ids, teacher_logits, ce_weight=1.0, kd_weight=1.0,
                             rank_weight=1.0, temperature=1.0, k=1.0, ignore_index=-100, reduction="mean"):
    """reference_loss from the student's full logits (..., V), in float64."""
    lead, top_k = logits.shape[:-1], teacher_ids.shape[-1]
    logits = logits.double().reshape(-1, logits.shape[-1])
    ids, teacher = teacher_ids.reshape(-1, top_k), teacher_logits.double().reshape(-1, top_k)
    counted = (torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if target is None
               else target.reshape(-1) != ignore_index)
    row = rank_weight * reference.row_losses(logits.gather(1, ids), teacher, k, "tanh")
    teacher_log_p = torch.log_softmax(teacher / temperature, 1)
    student_log_q = torch.log_softmax(logits / temperature, 1).gather(1, ids)
    row = row + kd_weight * temperature**2 * (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(1)
    if target is not None:
        row = row + ce_weight * F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore_index,
                                                reduction="none")
    row = torch.where(counted, row, 0)
    if reduction == "mean":
        return row.sum() / counted.sum().clamp(min=1)
    return row.sum() if reduction == "sum" else row.reshape(lead)


def make_case(lead, top_k, dtype=torch.float64, device="cpu", bias=True, ignored=0.2):
    """Student hidden states and head (logits with a spread of about 3), targets with a share ignored, and the top-K
    of a random teacher's logits, shuffled (the op takes them in any order)."""
    hidden = torch.randn(*lead, DIM, dtype=torch.float64)
    weight = 3 / DIM**0.5 * torch.randn(VOCAB, DIM, dtype=torch.float64)
    head_bias = torch.randn(VOCAB, dtype=torch.float64) if bias else None
    target = torch.randint(VOCAB, lead)
    target[torch.rand(lead) < ignored] = -100
    teacher_logits, teacher_ids = (3 * torch.randn(*lead, VOCAB, dtype=torch.float64)).topk(top_k)
    order = torch.rand(*lead, top_k).argsort(-1)
    teacher_ids, teacher_logits = teacher_ids.gather(-1, order), teacher_logits.gather(-1, order)
    to = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
    return (to(hidden), to(weight), target.to(device), teacher_ids.to(device), to(teacher_logits),
            to(head_bias))


def loss_and_grads(fn, hidden, weight, target, teacher_ids, teacher_logits, bias, upstream=None, **kwargs):
    """fn's loss and the gradients of hidden, weight and bias; "none" backpropagates a random upstream gradient (the
    one given, or a fresh one, returned) so that per-position scaling shows."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, teacher_ids=teacher_ids, teacher_logits=teacher_logits, bias=leaves[2],
              **kwargs)
    if upstream is None:
        upstream = torch.rand(loss.shape, dtype=torch.float64, device=loss.device) + 0.5
    (loss * upstream.to(loss.dtype)).sum().backward()
    return loss, [None if x is None else x.grad for x in leaves], upstream


def check(case, loss_tol, grad_tol, **kwargs):
    hidden, weight, target, teacher_ids, teacher_logits, bias = case
    loss, grads, upstream = loss_and_grads(rankkd.fused_linear_distill_loss, *case, **kwargs)
    kwargs.pop("chunk_size", None)
    ref, ref_grads, _ = loss_and_grads(reference_loss, hidden.double(), weight.double(), target, teacher_ids,
                                       teacher_logits, None if bias is None else bias.double(), upstream, **kwargs)
    assert loss.shape == ref.shape and loss.dtype == (torch.float64 if hidden.dtype == torch.float64
                                                      else torch.float32)
    assert rel_err(loss, ref) <= loss_tol
    for grad, ref_grad, x in zip(grads, ref_grads, (hidden, weight, bias)):
        if x is not None:
            assert grad.dtype == x.dtype and rel_err(grad, ref_grad) <= grad_tol
    return loss, grads


@pytest.mark.parametrize("top_k", [2, 7, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_float64_matches_reference(top_k, reduction, temperature):
    case = make_case((3, 7), top_k)
    case[2][1] = -100  # a whole sequence ignored
    check(case, 1e-10, 1e-10, ce_weight=0.7, kd_weight=1.3, rank_weight=0.9, temperature=temperature, k=0.8,
          chunk_size=4, reduction=reduction)


@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 2.0),
                                     (0.0, 1.5, 0.5)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_each_term_alone_and_in_pairs(weights, temperature):
    ce_weight, kd_weight, rank_weight = weights
    check(make_case((13,), 5, bias=False), 1e-10, 1e-10, ce_weight=ce_weight, kd_weight=kd_weight,
          rank_weight=rank_weight, temperature=temperature, chunk_size=6)


def test_target_none_counts_every_position():
    hidden, weight, _, teacher_ids, teacher_logits, bias = make_case((2, 5), 6)
    check((hidden, weight, None, teacher_ids, teacher_logits, bias), 1e-10, 1e-10, ce_weight=0.0, chunk_size=3)


@pytest.mark.parametrize("lead", [(), (1,)], ids=["0-d", "one"])
def test_single_position(lead):
    check(make_case(lead, 7, ignored=0.0), 1e-10, 1e-10, chunk_size=1024)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_target_ignored_gives_zero(reduction):
    case = make_case((2, 4), 7, ignored=1.0)
    loss, grads, _ = loss_and_grads(rankkd.fused_linear_distill_loss, *case, reduction=reduction)
    assert (loss == 0).all() and all((grad == 0).all() for grad in grads)
    torch.testing.assert_close(loss, reference_loss(*case[:5], bias=case[5], reduction=reduction), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_chunk_size_does_not_change_the_result(chunk_size):
    check(make_case((11,), 9), 1e-10, 1e-10, chunk_size=chunk_size, temperature=2.0)


def test_ranking_term_through_the_reference_backend(monkeypatch):
    # Without rankkd._C the ranking term falls back to plain PyTorch (rankkd.reference and the closed-form gradient).
    monkeypatch.setattr(rankkd.fused_linear, "_resolve_backend", lambda backend, device: "reference")
    check(make_case((2, 5), 9), 1e-10, 1e-10, k=1.7, chunk_size=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_float32_within_the_ops_bounds(device, reduction):
    check(make_case((4, 9), 16, dtype=torch.float32, device=device), FLOAT32_TOL, FLOAT32_TOL, temperature=2.0,
          chunk_size=8, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(device, dtype):
    # Against float64 on the rounded inputs.
    check(make_case((5, 8), 12, dtype=dtype, device=device), *HALF_TOL[dtype], temperature=2.0, chunk_size=16)


def test_only_the_gradients_asked_for():
    hidden, weight, target, teacher_ids, teacher_logits, bias = make_case((9,), 4)
    hidden.requires_grad_()
    loss = rankkd.fused_linear_distill_loss(hidden, weight, target, teacher_ids=teacher_ids,
                                            teacher_logits=teacher_logits, bias=bias)
    loss.backward()
    ref_hidden = hidden.detach().clone().requires_grad_()
    reference_loss(ref_hidden, weight, target, teacher_ids, teacher_logits, bias=bias).backward()
    assert weight.grad is None and bias.grad is None and rel_err(hidden.grad, ref_hidden.grad) <= 1e-10
    with torch.no_grad():
        no_grad_loss = rankkd.fused_linear_distill_loss(hidden, weight, target, teacher_ids=teacher_ids,
                                                        teacher_logits=teacher_logits, bias=bias)
    assert not no_grad_loss.requires_grad and no_grad_loss.item() == loss.item()


def test_module_matches_function():
    case = make_case((6,), 5)
    options = dict(ce_weight=0.5, kd_weight=2.0, rank_weight=0.3, temperature=1.5, k=2.0, chunk_size=4,
                   reduction="sum")
    module = rankkd.FusedLinearDistillLoss(**options)
    assert "rank_weight=0.3" in repr(module) and "validate=True" in repr(module)
    hidden, weight, target, teacher_ids, teacher_logits, bias = case
    torch.testing.assert_close(
        module(hidden, weight, target, teacher_ids=teacher_ids, teacher_logits=teacher_logits, bias=bias),
        rankkd.fused_linear_distill_loss(hidden, weight, target, teacher_ids=teacher_ids,
                                         teacher_logits=teacher_logits, bias=bias, **options), rtol=0, atol=0)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    hidden, weight, target, teacher_ids, teacher_logits, bias = make_case((7,), 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, upstream = loss_and_grads(rankkd.fused_linear_distill_loss, hidden, weight, target,
                                               teacher_ids, teacher_logits, bias)
    # The same as casting the inputs by hand; the gradients come back in the inputs' float32.
    cast = [x.bfloat16() for x in (hidden, weight, bias)]
    expected, expected_grads, _ = loss_and_grads(rankkd.fused_linear_distill_loss, cast[0], cast[1], target,
                                                 teacher_ids, teacher_logits, cast[2], upstream)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("reduction,compile_backend", [("mean", "inductor"), ("none", "aot_eager")])
def test_compile_fullgraph_matches_eager(reduction, compile_backend):
    case = make_case((3, 5), 8, dtype=torch.float32)

    def step(hidden, weight, target, *, teacher_ids, teacher_logits, bias):
        return 2 * rankkd.fused_linear_distill_loss(hidden, weight, target, teacher_ids=teacher_ids,
                                                    teacher_logits=teacher_logits, bias=bias, chunk_size=4,
                                                    temperature=2.0, reduction=reduction)

    eager, eager_grads, upstream = loss_and_grads(step, *case)
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    out, grads, _ = loss_and_grads(compiled, *case, upstream=upstream)
    torch.testing.assert_close(out, eager)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_compile_does_not_recompile_per_sequence_length():
    from torch._dynamo.utils import counters

    weight = torch.randn(VOCAB, DIM, requires_grad=True)

    def step(hidden, target, teacher_ids, teacher_logits):
        return rankkd.fused_linear_distill_loss(hidden, weight, target, teacher_ids=teacher_ids,
                                                teacher_logits=teacher_logits, chunk_size=4)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for length in (6, 9, 13, 22):  # the second length makes the graph dynamic; no later one recompiles
        teacher_logits, teacher_ids = torch.randn(2, length, VOCAB).topk(5)
        compiled(torch.randn(2, length, DIM, requires_grad=True), torch.randint(VOCAB, (2, length)), teacher_ids,
                 teacher_logits).backward()
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(reduction):
    hidden, weight, target, teacher_ids, teacher_logits, bias = make_case((6,), 4, dtype=torch.float32)
    row_scale = torch.rand(6) if reduction == "none" else None
    args = (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), target, teacher_ids,
            teacher_logits, row_scale, 1.0, 1.0, 1.0, 2.0, 1.0, -100, 4, reduction, True, True, True, True)
    torch.library.opcheck(torch.ops.rankkd.fused_linear_distill.default, args)


def test_double_backward_is_refused():
    hidden, weight, target, teacher_ids, teacher_logits, bias = make_case((4,), 3)
    hidden.requires_grad_()
    loss = rankkd.fused_linear_distill_loss(hidden, weight, target, teacher_ids=teacher_ids,
                                            teacher_logits=teacher_logits)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def _bad_inputs():
    """(name, change to the valid call, exception, what the message names)."""
    def case_with(**changes):
        return changes

    return [
        ("weight dim", case_with(weight=torch.randn(VOCAB, DIM + 1, dtype=torch.float64)), ValueError,
         r"weight \(the LM head\) must have shape \(V, d\)"),
        ("weight dtype", case_with(weight=torch.randn(VOCAB, DIM)), TypeError, "weight dtype torch.float32"),
        ("integer hidden", case_with(hidden=torch.ones(4, DIM, dtype=torch.long)), TypeError, "hidden must be"),
        ("bias shape", case_with(bias=torch.randn(VOCAB - 1, dtype=torch.float64)), ValueError, r"bias .* \(V,\)"),
        ("target shape", case_with(target=torch.zeros(5, dtype=torch.long)), ValueError, "target must have"),
        ("float target", case_with(target=torch.zeros(4)), TypeError, "target must be a tensor of integer"),
        ("target none", case_with(target=None), ValueError, "target is None but ce_weight > 0"),
        ("ids shape", case_with(teacher_ids=torch.zeros(4, dtype=torch.long)), ValueError,
         r"teacher_ids must have shape \(\.\.\., K\)"),
        ("float ids", case_with(teacher_ids=torch.zeros(4, 3)), TypeError, "teacher_ids must be a tensor of integer"),
        ("logits shape", case_with(teacher_logits=torch.zeros(4, 2, dtype=torch.float64)), ValueError,
         "teacher_logits shape"),
        ("K > V", case_with(teacher_ids=torch.arange(VOCAB + 1).repeat(4, 1),
                            teacher_logits=torch.zeros(4, VOCAB + 1, dtype=torch.float64)), ValueError, "K <= V"),
        ("K = 1", case_with(teacher_ids=torch.zeros(4, 1, dtype=torch.long),
                            teacher_logits=torch.zeros(4, 1, dtype=torch.float64)), ValueError, "K >= 2"),
        ("id range", case_with(teacher_ids=torch.tensor([[0, 1, VOCAB]] * 4)), ValueError,
         f"teacher_ids holds token id {VOCAB}"),
        ("duplicate id", case_with(teacher_ids=torch.tensor([[0, 1, 2]] * 3 + [[5, 9, 5]])), ValueError,
         "teacher_ids repeats a token id at position 3"),
        ("non-finite teacher", case_with(teacher_logits=torch.tensor([[0.0, 1.0, float("inf")]] * 4,
                                                                     dtype=torch.float64)), ValueError,
         "teacher_logits holds a NaN or infinite"),
        ("target range", case_with(target=torch.tensor([0, 1, -1, 2])), ValueError, "target holds token id -1"),
        ("negative weight", case_with(kd_weight=-1.0), ValueError, "kd_weight must be >= 0"),
        ("all weights zero", case_with(ce_weight=0.0, kd_weight=0.0, rank_weight=0.0), ValueError, "all 0"),
        ("temperature", case_with(temperature=0.0), ValueError, "temperature must be > 0"),
        ("k", case_with(k=float("nan")), ValueError, r"k \(the tanh steepness\)"),
        ("chunk size", case_with(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
        ("reduction", case_with(reduction="batchmean"), ValueError, "reduction must be one of"),
        ("ignore_index", case_with(ignore_index=1.5), ValueError, "ignore_index must be an integer"),
        ("validate", case_with(validate=1), ValueError, "validate must be True or False"),
    ]


@pytest.mark.parametrize("name,changes,error,message", _bad_inputs(), ids=[case[0] for case in _bad_inputs()])
def test_bad_input_is_refused_by_name(name, changes, error, message):
    kwargs = dict(hidden=torch.randn(4, DIM, dtype=torch.float64),
                  weight=torch.randn(VOCAB, DIM, dtype=torch.float64), target=torch.tensor([0, 1, -100, 2]),
                  teacher_ids=torch.tensor([[0, 1, 2]] * 4), teacher_logits=torch.randn(4, 3, dtype=torch.float64),
                  bias=None)
    kwargs.update(changes)
    with pytest.raises(error, match=message):
        rankkd.fused_linear_distill_loss(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("target"), **kwargs)


def test_validate_false_skips_the_value_checks():
    hidden, weight = torch.randn(2, DIM, dtype=torch.float64), torch.randn(VOCAB, DIM, dtype=torch.float64)
    teacher_ids, teacher_logits = torch.tensor([[3, 3], [1, 2]]), torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="repeats a token id"):
        rankkd.fused_linear_distill_loss(hidden, weight, torch.tensor([0, 1]), teacher_ids=teacher_ids,
                                         teacher_logits=teacher_logits)
    loss = rankkd.fused_linear_distill_loss(hidden, weight, torch.tensor([0, 1]), teacher_ids=teacher_ids,
                                            teacher_logits=teacher_logits, validate=False)
    assert loss.isfinite()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_teacher_topk_matches_full_logits(dtype):
    hidden, weight, _, _, _, bias = make_case((3, 7), 2, dtype=dtype)
    ids, values = rankkd.teacher_topk(hidden, weight, 10, bias=bias, chunk_size=4)
    expected = F.linear(hidden, weight, bias).topk(10)
    assert ids.shape == values.shape == (3, 7, 10) and ids.dtype == torch.long and values.dtype == dtype
    torch.testing.assert_close(values, expected.values, rtol=0, atol=0)
    torch.testing.assert_close(ids, expected.indices, rtol=0, atol=0)
    full_ids, _ = rankkd.teacher_topk(hidden, weight, VOCAB, chunk_size=5)
    assert (full_ids.sort(-1).values == torch.arange(VOCAB)).all()
    with pytest.raises(ValueError, match=f"k must be <= V = {VOCAB}"):
        rankkd.teacher_topk(hidden, weight, VOCAB + 1)


def test_benchmark_runs_and_both_implementations_agree(tmp_path):
    out = tmp_path / "fused_linear.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "fused_linear_bench.py"), "--device", "cpu", "--shapes",
                    "96x300x16", "--top-k", "8", "--chunk-size", "40", "--repeats", "1", "--impls", "fused,plain",
                    "--json", str(out)], check=True, capture_output=True)
    (shape,) = json.loads(out.read_text())["shapes"]
    assert [row["impl"] for row in shape["results"]] == ["fused", "plain"]
    assert all(row["ms"] > 0 and row["peak_extra_mib"] >= 0 for row in shape["results"])
    assert shape["loss_rel_diff"] <= 1e-6


class TinyCausalLM(torch.nn.Module):
    """A plain-PyTorch stand-in with the interface the README's example uses from a Hugging Face causal LM:
    forward(input_ids, attention_mask, output_hidden_states, logits_to_keep) -> .hidden_states (the last one
    normalized, what the head reads) and .logits; base_model (the model without its head) -> .last_hidden_state;
    get_output_embeddings()."""

    def __init__(self, vocab, dim, layers):
        super().__init__()
        self.base_model = TinyDecoder(vocab, dim, layers)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, logits_to_keep=0):
        out = self.base_model(input_ids, attention_mask)
        return types.SimpleNamespace(logits=self.lm_head(out.last_hidden_state[:, -logits_to_keep:]),
                                     hidden_states=out.hidden_states if output_hidden_states else None)


class TinyDecoder(torch.nn.Module):
    def __init__(self, vocab, dim, layers):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(torch.nn.GRU(dim, dim, batch_first=True) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, input_ids, attention_mask=None):
        states = [self.embed(input_ids)]
        for layer in self.layers:
            states.append(states[-1] + layer(states[-1])[0])
        states[-1] = self.norm(states[-1])
        return types.SimpleNamespace(last_hidden_state=states[-1], hidden_states=tuple(states))


def readme_block(name):
    text = (ROOT / "README.md").read_text()
    start, end = f"<!-- {name} start -->", f"<!-- {name} end -->"
    assert start in text and end in text, f"no {start} ... {end} section in README.md"
    blocks = re.findall(r"```python\n(.*?)```", text.split(start, 1)[1].split(end, 1)[0], flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one ```python block between {start} and {end}"
    return blocks[0]


def test_readme_causal_lm_example_matches_the_unfused_loss():
    namespace = {"__name__": "readme_example"}
    exec(compile(readme_block("causal-LM example"), "README.md", "exec"), namespace)
    torch.manual_seed(0)
    student, teacher = TinyCausalLM(VOCAB, 16, 1), TinyCausalLM(VOCAB, 32, 2)
    input_ids = torch.randint(VOCAB, (3, 9))
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    loss_fn = rankkd.FusedLinearDistillLoss(kd_weight=0.5, rank_weight=0.5, chunk_size=8)
    loss = namespace["causal_lm_distill_loss"](student, teacher, batch, loss_fn, top_k=6)
    loss.backward()

    # The same loss from the full logits, unfused.
    grads = [p.grad for p in student.parameters()]
    student.zero_grad()
    with torch.no_grad():
        teacher_full = teacher(input_ids).logits
        teacher_logits, teacher_ids = teacher_full[:, :-1].topk(6)
    hidden = student.base_model(input_ids).last_hidden_state[:, :-1]
    expected = reference_loss(hidden, student.lm_head.weight, labels[:, 1:], teacher_ids, teacher_logits,
                              kd_weight=0.5, rank_weight=0.5)
    expected.backward()
    assert rel_err(loss, expected) <= FLOAT32_TOL
    for grad, param in zip(grads, student.parameters()):
        assert rel_err(grad, param.grad) <= FLOAT32_TOL
