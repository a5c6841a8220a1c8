"""Causal language models for distillation: a small zoo built from Hugging Face configs in code, any local folder
written by save_pretrained, or a hub name; the checks a student-teacher pair must pass; and the pieces of a model the
fused LM-head loss works on (the last hidden state and the output embeddings), taken without forming the logits.

The zoo's GPT-2 pair is sized for the CPU demo (an ~8k vocabulary, a few minutes on 2 cores for teacher and student
together): the teacher is 4 layers of width 256, the student 2 layers of width 128, both with 64-dimensional heads and
tied input and output embeddings (at 8192 tokens and 256 positions: 5.3M parameters, 3.2M outside the embeddings, and
1.5M, 0.4M outside them). Measured on a shared 2-core CPU at 16 x 256 tokens a step, the teacher trains at about 3.9k
tokens/s and the student at about 15k, and the teacher's forward pass runs at about 14k: a teacher trained for two
minutes still leaves the student time to learn from it online. Dropout is off, as nanoGPT has it for pretraining: a
short run sees each token about once and does not overfit."""
import functools
import hashlib
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

# Positions a zoo model is built for unless the caller says otherwise (GPT-2's own).
ZOO_CONTEXT = 1024


def gpt2_config(vocab_size, context, *, layers, width, heads):
    return GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def llama_config(vocab_size, context, *, layers, width, heads, kv_heads, ffn_width):
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=context, hidden_size=width,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       intermediate_size=ffn_width, bos_token_id=None, eos_token_id=None)


ZOO = {  # name: function(vocab_size, context) -> the model's config
    "gpt-demo-teacher": functools.partial(gpt2_config, layers=4, width=256, heads=4),
    "gpt-demo-student": functools.partial(gpt2_config, layers=2, width=128, heads=2),
    # The other common layout (rotary positions, RMSNorm, grouped-query attention, an untied head), for tests.
    "llama-tiny": functools.partial(llama_config, layers=2, width=64, heads=4, kv_heads=2, ffn_width=128),
}


def _check_size(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def load_causal_lm(name_or_folder, *, vocab_size=None, context=None, dtype=torch.float32):
    """A causal LM in `dtype`: a zoo model, freshly initialised; a folder written by save_pretrained; or a Hugging Face
    hub name (loads where the hub is reachable).

    vocab_size and context are the token ids and positions the model must take: a zoo model is built with exactly
    these (vocab_size is required, context defaults to ZOO_CONTEXT); a pretrained model is refused when it has fewer
    output rows or positions."""
    if vocab_size is not None:
        _check_size("vocab_size", vocab_size, 2)
    if context is not None:
        _check_size("context", context, 1)
    if name_or_folder in ZOO:
        if vocab_size is None:
            raise ValueError(f"zoo model {name_or_folder!r} needs vocab_size (the tokenizer's vocabulary size)")
        config = ZOO[name_or_folder](vocab_size, ZOO_CONTEXT if context is None else context)
        return AutoModelForCausalLM.from_config(config).to(dtype)
    name = os.path.expanduser(str(name_or_folder))
    if not os.path.isdir(name) and (os.path.isabs(name) or name.startswith(".")):
        raise ValueError(f"model folder {name!r} does not exist (zoo models: {', '.join(ZOO)})")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if os.path.isdir(name):
            raise ValueError(f"folder {name!r} holds no causal LM written by save_pretrained ({reason})") from None
        raise ValueError(f"unknown model {name!r}: give a zoo model ({', '.join(ZOO)}), a folder written by "
                         f"save_pretrained, or a Hugging Face hub name (loads where the hub is reachable; here: "
                         f"{reason})") from None
    rows = lm_head(model)[0].shape[0]
    if vocab_size is not None and rows < vocab_size:
        raise ValueError(f"model {name!r} has {rows} output rows, fewer than the {vocab_size} token ids of the "
                         "vocabulary")
    if context is not None and context_length(model) < context:
        raise ValueError(f"model {name!r} takes {context_length(model)} positions, fewer than the {context} asked "
                         "for")
    return model


def context_length(model):
    """The most positions the model takes (its config's max_position_embeddings, or n_positions for GPT-2)."""
    config = model.config
    for field in ("max_position_embeddings", "n_positions"):
        if getattr(config, field, None) is not None:
            return getattr(config, field)
    raise ValueError(f"{type(model).__name__}'s config states no context length (max_position_embeddings or "
                     "n_positions)")


def _output_embeddings(model):
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output embeddings are {type(head).__name__}, not a linear layer")
    return head


def lm_head(model):
    """(weight (V, d), bias (V,) or None) of the model's output embeddings: its logits are
    final_hidden(model, ...) @ weight.T (+ bias)."""
    head = _output_embeddings(model)
    return head.weight, head.bias


def final_hidden(model, input_ids, attention_mask=None):
    """The model's last hidden state (batch, positions, d) for `input_ids`, after its final norm and before its
    output embeddings, computed without the logits: the output of its decoder trunk (model.base_model, e.g.
    GPT-2's `transformer`, Llama's `model`), which is what its own head multiplies."""
    trunk = model.base_model
    if trunk is model:
        raise ValueError(f"{type(model).__name__} has no decoder trunk apart from its head (base_model is itself)")
    return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def check_plain_head(model, role="model"):
    """Raise a ValueError unless the model's logits are exactly its output embeddings applied to final_hidden: no
    soft-capping, scaling or other step between the trunk and the logits (Gemma 2's soft-cap, Cohere's and Granite's
    scales), which the fused loss, working on the trunk's output and the head's weights, would leave out. Runs the
    model once on a few tokens and watches its output embeddings."""
    head = _output_embeddings(model)
    seen = {}
    hook = head.register_forward_hook(lambda module, args, output: seen.update(hidden=args[0], logits=output))
    input_ids = torch.arange(min(8, head.weight.shape[0]), device=head.weight.device).unsqueeze(0)
    was_training = model.training
    model.eval()  # the two passes below must agree: no dropout
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits
            hidden = final_hidden(model, input_ids)
    finally:
        hook.remove()
        model.train(was_training)
    what = f"the {role} ({type(model).__name__})"
    if not seen:
        raise ValueError(f"{what} forms its logits without calling its output embeddings")
    if not torch.equal(logits, seen["logits"].to(logits.dtype)):
        raise ValueError(f"{what} transforms its logits after its output embeddings (soft-capping or scaling); the "
                         "fused loss needs logits = hidden @ weight.T + bias")
    if seen["hidden"].shape != hidden.shape or not torch.allclose(seen["hidden"], hidden, rtol=1e-3, atol=1e-5):
        raise ValueError(f"{what} transforms its last hidden state before its output embeddings (a scale); the fused "
                         "loss needs logits = final_hidden @ weight.T + bias")


def _vocab_difference(student_vocab, teacher_vocab):
    """The first difference between two token -> id maps, in the teacher's id order, in words."""
    for token, index in sorted(teacher_vocab.items(), key=lambda item: item[1]):
        if student_vocab.get(token) != index:
            held = "lacks it" if token not in student_vocab else f"has it as id {student_vocab[token]}"
            return f"the teacher's token {token!r} is id {index}, the student's tokenizer {held}"
    extra = min((index, token) for token, index in student_vocab.items() if token not in teacher_vocab)
    return f"the student's token {extra[1]!r} (id {extra[0]}) is not in the teacher's"


def check_pair(student, teacher, student_tokenizer=None, teacher_tokenizer=None):
    """Raise a ValueError unless the student and teacher can be distilled one into the other: the same vocabulary
    (output rows and config.vocab_size), the same tokenizer (its token -> id map) when both are given, and plain
    heads (check_plain_head) on both."""
    rows = lm_head(student)[0].shape[0], lm_head(teacher)[0].shape[0]
    if rows[0] != rows[1]:
        raise ValueError(f"student and teacher vocabularies differ: the student has {rows[0]} output rows, the "
                         f"teacher {rows[1]}; distillation needs one tokenizer and vocabulary")
    sizes = getattr(student.config, "vocab_size", None), getattr(teacher.config, "vocab_size", None)
    if None not in sizes and sizes[0] != sizes[1]:
        raise ValueError(f"student and teacher vocabularies differ: config.vocab_size is {sizes[0]} for the student, "
                         f"{sizes[1]} for the teacher")
    if student_tokenizer is not None and teacher_tokenizer is not None:
        student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            difference = _vocab_difference(student_vocab, teacher_vocab)
            raise ValueError(f"student and teacher tokenizers differ: {difference}")
    check_plain_head(student, "student")
    check_plain_head(teacher, "teacher")


def weights_digest(model):
    """A SHA-256 hex digest of the model's weights: every state_dict entry's name, dtype, shape and bytes, so two
    models share a digest exactly when their state_dicts are equal (a top-K dump names its teacher by it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
