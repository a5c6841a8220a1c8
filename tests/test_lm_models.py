"""rankkd.lm.models: the zoo, loading by zoo name or folder, the pair checks, and the last hidden state and output
embeddings against the models' own logits (GPT-2 and Llama layouts)."""
import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="the LM task's models are Hugging Face models (pip install transformers)")
tokenizers = pytest.importorskip("tokenizers")
from transformers import Gemma2Config, GraniteConfig, AutoModelForCausalLM  # noqa: E402

from rankkd.lm import models  # noqa: E402

VOCAB, CONTEXT = 263, 40  # odd sizes: nothing may assume a power of two


def build(name, vocab_size=VOCAB, seed=0, **options):
    torch.manual_seed(seed)
    return models.load_causal_lm(name, vocab_size=vocab_size, context=CONTEXT, **options)


@pytest.mark.parametrize("name", list(models.ZOO))
def test_zoo_models_take_the_vocabulary_and_context_asked_for(name):
    model = build(name)
    assert model.get_output_embeddings().weight.shape[0] == VOCAB == model.config.vocab_size
    assert models.context_length(model) == CONTEXT
    input_ids = torch.randint(VOCAB, (2, CONTEXT))
    assert model(input_ids=input_ids).logits.shape == (2, CONTEXT, VOCAB)


def test_demo_teacher_is_the_larger_model():
    teacher, student = (models.ZOO[name](VOCAB, CONTEXT) for name in ("gpt-demo-teacher", "gpt-demo-student"))
    assert teacher.n_layer > student.n_layer and teacher.n_embd > student.n_embd


def test_zoo_model_in_the_dtype_asked_for():
    model = build("llama-tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("biased_head", [False, True])
@pytest.mark.parametrize("name", ["gpt-demo-student", "llama-tiny"])
def test_final_hidden_times_the_head_is_the_models_logits(name, biased_head):
    model = build(name).double().eval()
    if biased_head:  # neither layout has a bias; a head with one must hand it over
        head = nn.Linear(model.config.hidden_size, VOCAB, bias=True, dtype=torch.float64)
        nn.init.normal_(head.bias)
        model.set_output_embeddings(head)
    input_ids = torch.randint(VOCAB, (3, 29))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 21:] = 0  # a shorter sequence, padded on the right
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = models.final_hidden(model, input_ids, attention_mask)
    weight, bias = models.lm_head(model)
    assert (bias is not None) == biased_head
    assert hidden.shape == (3, 29, model.config.hidden_size)
    torch.testing.assert_close(hidden @ weight.T + (0 if bias is None else bias), logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gpt-demo-student", "llama-tiny"])
def test_save_pretrained_folder_loads_back_the_same_model(name, tmp_path):
    model = build(name).eval()
    model.save_pretrained(tmp_path / "model")
    loaded = models.load_causal_lm(tmp_path / "model", vocab_size=VOCAB, context=CONTEXT).eval()
    assert type(loaded) is type(model)
    assert models.weights_digest(loaded) == models.weights_digest(model)
    assert (models.lm_head(loaded)[0] is loaded.get_input_embeddings().weight) == model.config.tie_word_embeddings
    input_ids = torch.randint(VOCAB, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"has {VOCAB} output rows, fewer than the {VOCAB + 1} token ids"):
        models.load_causal_lm(tmp_path / "model", vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match=f"takes {CONTEXT} positions, fewer than the {CONTEXT + 1} asked for"):
        models.load_causal_lm(tmp_path / "model", context=CONTEXT + 1)


def test_weights_digest_follows_every_weight():
    model = build("llama-tiny")
    digest = models.weights_digest(model)
    assert models.weights_digest(build("llama-tiny")) == digest  # same seed, same weights
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert models.weights_digest(model) != digest
    assert models.weights_digest(model.to(torch.bfloat16)) != models.weights_digest(model.float())


def test_unknown_names_are_refused_in_one_line(tmp_path):
    """Neither name reaches the network: one is no valid hub name, the other a path."""
    zoo = ", ".join(models.ZOO)
    with pytest.raises(ValueError) as error:
        models.load_causal_lm("no such model", vocab_size=VOCAB)
    assert str(error.value).startswith(f"unknown model 'no such model': give a zoo model ({zoo}), a folder written by "
                                       "save_pretrained, or a Hugging Face hub name")
    missing = tmp_path / "missing"
    with pytest.raises(ValueError) as path_error:
        models.load_causal_lm(str(missing), vocab_size=VOCAB)
    assert str(path_error.value) == f"model folder '{missing}' does not exist (zoo models: {zoo})"
    assert "\n" not in str(error.value) + str(path_error.value)
    with pytest.raises(ValueError, match=f"folder '{tmp_path}' holds no causal LM written by save_pretrained"):
        models.load_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="zoo model 'gpt-demo-student' needs vocab_size"):
        models.load_causal_lm("gpt-demo-student")
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 2, got 1"):
        models.load_causal_lm("gpt-demo-student", vocab_size=1)


def word_tokenizer(tokens):
    vocab = {token: index for index, token in enumerate(tokens)}
    return tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=tokens[0]))


def test_check_pair_accepts_a_pair_sharing_vocabulary_and_tokenizer():
    tokens = ["<unk>"] + [f"w{i}" for i in range(VOCAB - 1)]
    models.check_pair(build("gpt-demo-student"), build("llama-tiny"), word_tokenizer(tokens), word_tokenizer(tokens))


def test_check_pair_refuses_different_vocabularies():
    student = build("gpt-demo-student", vocab_size=VOCAB - 1)
    with pytest.raises(ValueError, match=f"the student has {VOCAB - 1} output rows, the teacher {VOCAB}"):
        models.check_pair(student, build("llama-tiny"))
    teacher = build("llama-tiny")
    teacher.config.vocab_size = VOCAB + 7
    with pytest.raises(ValueError, match=f"config.vocab_size is {VOCAB} for the student, {VOCAB + 7} for the teacher"):
        models.check_pair(build("gpt-demo-student"), teacher)


def test_check_pair_refuses_different_tokenizers():
    student, teacher = build("gpt-demo-student"), build("llama-tiny")
    tokens = ["<unk>"] + [f"w{i}" for i in range(VOCAB - 1)]
    swapped = tokens[:5] + [tokens[6], tokens[5]] + tokens[7:]
    with pytest.raises(ValueError, match="tokenizers differ: the teacher's token 'w4' is id 5, the student's "
                                         "tokenizer has it as id 6"):
        models.check_pair(student, teacher, word_tokenizer(swapped), word_tokenizer(tokens))
    renamed = tokens[:-1] + ["other"]
    with pytest.raises(ValueError, match=f"the teacher's token 'w{VOCAB - 2}' is id {VOCAB - 1}, the student's "
                                         "tokenizer lacks it"):
        models.check_pair(student, teacher, word_tokenizer(renamed), word_tokenizer(tokens))


def test_heads_that_transform_the_logits_are_refused():
    """Gemma 2 soft-caps its logits, Granite scales them: the fused loss would compute other logits than the model's."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    for config in (Gemma2Config(head_dim=16, final_logit_softcapping=30.0, **common),
                   GraniteConfig(logits_scaling=8.0, **common)):
        with pytest.raises(ValueError, match=r"^the teacher \(\w+\) transforms its logits after its output embeddings"):
            models.check_pair(build("gpt-demo-student"), AutoModelForCausalLM.from_config(config))
    scaled = build("llama-tiny")
    scaled.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(ValueError, match=r"^the student \(LlamaForCausalLM\) transforms its last hidden state"):
        models.check_pair(scaled, build("gpt-demo-student"))
