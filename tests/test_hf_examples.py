"""The README's Hugging Face examples run as written, offline: tiny causal LMs (Qwen2, GPT-2 and Llama layouts) and a
byte-level BPE tokenizer are built here and saved where the examples' hub names point. The loss equals the unfused
float64 one from the same checkpoints' full logits (tests/test_fused_linear.py's reference), and training moves the
student as plain SGD on that loss would, never the teacher."""
import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face examples need transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig,  # noqa: E402
                          PreTrainedTokenizerFast, Qwen2Config, TrainingArguments)

from conftest import rel_err  # noqa: E402
from test_fused_linear import FLOAT32_TOL, readme_block, reference_loss_of_logits  # noqa: E402

STUDENT_HUB_NAME, TEACHER_HUB_NAME = "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B"
PAD = "<|endoftext|>"
# Beyond the tokenizer's 300 tokens, as Qwen2.5's head (151,936 rows for 151,665 tokens).
VOCAB = 307
# Logits with a spread of a few units (the configs' default 0.02 gives about 0.1).
INIT_RANGE = 0.4
# Gradients through a model in float32 (attention, norms, sums of a few dozen terms) are some 1e-6 from float64's, the
# step's weights as close: within 5e-5 of them. Losses compare within the op's FLOAT32_TOL.
MODEL_FLOAT32_TOL = 5e-5
SENTENCES = ["The student learns the order in which the teacher ranks the next tokens.",
             "Kendall's tau counts the pairs on which two rankings agree.",
             "A fused loss never holds the logits of every position at once."]


def tiny_config(layout, dim):
    """A 2-layer causal LM of the layout, its head `dim` wide. No dropout (GPT-2 has it by default): a training step
    is then the same function of the weights as the reference's."""
    if layout == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=dim, n_layer=2, n_head=4, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_RANGE, bos_token_id=0,
                          eos_token_id=0)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[layout]
    return config_class(vocab_size=VOCAB, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        initializer_range=INIT_RANGE, tie_word_embeddings=layout == "qwen2", bos_token_id=0,
                        eos_token_id=0)


def tiny_tokenizer():
    """Byte-level BPE trained on a few sentences (any text encodes), the end-of-text token its padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=PAD)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders as from_pretrained reads them: a Qwen2 student and teacher (the README's pair), a GPT-2 student and a
    Llama teacher; saved in bfloat16, as Qwen2.5's are, with the tokenizer beside each student."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    for name, layout, dim in [("qwen2-student", "qwen2", 32), ("qwen2-teacher", "qwen2", 48),
                              ("gpt2-student", "gpt2", 32), ("llama-teacher", "llama", 48)]:
        AutoModelForCausalLM.from_config(tiny_config(layout, dim)).to(torch.bfloat16).save_pretrained(root / name)
        if name.endswith("student"):
            tokenizer.save_pretrained(root / name)
    return root


def load(folder, dtype):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def example_namespace(*names):
    """A namespace in which the causal-LM example and then the named README examples have run."""
    namespace = {"__name__": "readme_example"}
    for name in ("causal-LM example", *names):
        exec(compile(readme_block(name), "README.md", "exec"), namespace)
    return namespace


def reference_distill_loss(student, teacher, batch, loss_fn, top_k):
    """causal_lm_distill_loss the plain way: both models' full logits (their forward as it is, head included), the
    teacher's top-K by torch.topk, the loss in float64."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits, teacher_ids = teacher(**inputs).logits[:, :-1].topk(top_k)
    options = {name: getattr(loss_fn, name)
               for name in ("ce_weight", "kd_weight", "rank_weight", "temperature", "k", "ignore_index", "reduction")}
    return reference_loss_of_logits(student(**inputs).logits[:, :-1], batch["labels"][:, 1:], teacher_ids,
                                    teacher_logits, **options)


@pytest.mark.parametrize("student_name,teacher_name", [("qwen2-student", "qwen2-teacher"),
                                                       ("gpt2-student", "llama-teacher")], ids=["qwen2", "gpt2-llama"])
def test_hugging_face_example_matches_the_unfused_loss(checkpoints, student_name, teacher_name):
    code = readme_block("hugging-face example")
    # The hub's checkpoints are the tiny ones, the GPU is the CPU, and float32 replaces bfloat16 so that the loss
    # compares with float64 within float32's bound.
    for old, new in {f'"{STUDENT_HUB_NAME}"': repr(str(checkpoints / student_name)),
                     f'"{TEACHER_HUB_NAME}"': repr(str(checkpoints / teacher_name)),
                     ".cuda()": ".cpu()", '"cuda"': '"cpu"', "torch.bfloat16": "torch.float32"}.items():
        assert old in code, f"the README's Hugging Face example no longer has {old}"
        code = code.replace(old, new)
    namespace = example_namespace()
    calls, distill_loss = [], namespace["causal_lm_distill_loss"]
    signature = inspect.signature(distill_loss)

    def recorded_distill_loss(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs))
        return distill_loss(*args, **kwargs)

    namespace["causal_lm_distill_loss"] = recorded_distill_loss
    exec(compile(code, "README.md", "exec"), namespace)

    student, teacher, loss = namespace["student"], namespace["teacher"], namespace["loss"]
    (call,) = calls
    call.apply_defaults()
    batch, loss_fn, top_k = call.arguments["batch"], call.arguments["loss_fn"], call.arguments["top_k"]
    assert student.dtype == torch.float32 and loss.isfinite()
    assert (batch["attention_mask"] == 0).any(), "the example's batch has no padding to mask"
    assert all(param.grad is None for param in teacher.parameters())

    # The same checkpoints in float64, the loss from their full logits.
    reference_student = load(checkpoints / student_name, torch.float64)
    expected = reference_distill_loss(reference_student, load(checkpoints / teacher_name, torch.float64), batch,
                                      loss_fn, top_k)
    expected.backward()
    assert rel_err(loss, expected) <= FLOAT32_TOL
    for (name, param), reference_param in zip(student.named_parameters(), reference_student.parameters()):
        assert rel_err(param.grad, reference_param.grad) <= MODEL_FLOAT32_TOL, name
        assert not torch.equal(param.detach().double(), reference_param.detach()), f"{name} did not move"


def test_trainer_example_trains_as_sgd_on_the_unfused_loss(checkpoints, tmp_path):
    namespace = example_namespace("trainer example")
    student = load(checkpoints / "qwen2-student", torch.float32)
    teacher = load(checkpoints / "qwen2-teacher", torch.float32)
    # Rows of one length with a 3-token prompt: every micro-batch counts as many positions, so two steps of two
    # accumulated micro-batches are two full-batch steps on the mean over the four rows, in whatever order the
    # sampler draws them.
    input_ids = torch.randint(VOCAB, (4, 11), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :3] = -100
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": row_labels}
            for ids, row_labels in zip(input_ids, labels)]
    tokenizer = AutoTokenizer.from_pretrained(checkpoints / "qwen2-student")
    eval_batch = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True)
    eval_batch["labels"] = eval_batch["input_ids"].masked_fill(eval_batch["attention_mask"] == 0, -100)
    learning_rate = 0.05
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no",
                             max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             optim="sgd", learning_rate=learning_rate, lr_scheduler_type="constant",
                             max_grad_norm=0.0, logging_steps=1, per_device_eval_batch_size=2,
                             prediction_loss_only=True, disable_tqdm=True)
    trainer = namespace["RankKDTrainer"](model=student, args=args, train_dataset=rows, teacher_model=teacher,
                                         eval_dataset=[{key: value[i] for key, value in eval_batch.items()}
                                                       for i in range(2)])
    trainer.train()

    # Two plain SGD steps on the unfused loss, in float64 from the same checkpoints.
    reference_student = load(checkpoints / "qwen2-student", torch.float64)
    reference_teacher = load(checkpoints / "qwen2-teacher", torch.float64)
    initial = [param.detach().clone() for param in reference_student.parameters()]
    full_batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    expected_losses = []
    for _ in range(2):
        expected = reference_distill_loss(reference_student, reference_teacher, full_batch, trainer.distill_loss,
                                          trainer.top_k)
        grads = torch.autograd.grad(expected, list(reference_student.parameters()))
        with torch.no_grad():
            for param, grad in zip(reference_student.parameters(), grads):
                param -= learning_rate * grad
        expected_losses.append(expected.item())
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and rel_err(torch.tensor(losses), torch.tensor(expected_losses)) <= FLOAT32_TOL
    for (name, param), reference_param, start in zip(student.named_parameters(), reference_student.parameters(),
                                                     initial):
        assert rel_err(param - start, reference_param - start) <= MODEL_FLOAT32_TOL, name
    assert all(torch.equal(param.double(), reference_param) for param, reference_param in
               zip(trainer.teacher_model.parameters(), reference_teacher.parameters()))

    # compute_loss on a padded batch, and evaluation (prediction_loss_only), against the trained student's weights.
    with torch.no_grad():
        expected = reference_distill_loss(copy.deepcopy(student).double(), reference_teacher, eval_batch,
                                          trainer.distill_loss, trainer.top_k)
        loss = trainer.compute_loss(student, dict(eval_batch))
    assert rel_err(loss, expected) <= FLOAT32_TOL
    assert rel_err(torch.tensor(trainer.evaluate()["eval_loss"]), expected) <= FLOAT32_TOL
