"""Causal language-model distillation: a student that shares the teacher's tokenizer, trained with the fused LM-head
loss (cross-entropy + KD over the teacher's top-K tokens + the Kendall ranking loss over them).

Models are Hugging Face causal LMs: a local folder written by save_pretrained, a hub name (where the hub is
reachable), or a model of rankkd.lm.models' zoo (the demo's GPT-2-layout pair). Data: .txt files (a document each)
and .jsonl files (a document per line, its "text"), or folders of them, tokenized with the teacher's tokenizer,
split into train and validation by document and packed into sequences of --seq-len, document boundaries kept out of
the loss. The teacher's top-K comes from the teacher itself, run on every batch, or from a dump written once by
--dump-teacher-topk and read by --teacher-topk (the teacher is then never loaded).

The run itself is rankkd.training.trainer's, shared with the other tasks."""
import math
from pathlib import Path

import torch

from rankkd.data.demo import default_cache_dir
from rankkd.distill import DistillConfig
from rankkd.distributed import all_reduce_sum, barrier, cleanup_distributed, init_distributed
from rankkd.fused_linear import FusedLinearDistillLoss
from rankkd.lm import models as lm_zoo
from rankkd.lm import text
from rankkd.lm.distill import LMDistiller
from rankkd.lm.loaders import SequenceTrainLoader, SequenceValLoader
from rankkd.lm.topk_store import TopKManifest, TopKStore, TopKWriter, dump_teacher_topk
from rankkd.models.weights import read_checkpoint_weights
from rankkd.training import trainer
from rankkd.training.checkpoint import seed_everything
from rankkd.training.config import Option, make_parser, resolve_config
from rankkd.training.metrics import kendall_tau
from rankkd.training.run_folder import check_writable
from rankkd.training.task import Task, TaskData

# ----------------------------------------------------------------------------------------------------------------------
# Recipes.

# A real pair (e.g. a 1-3B teacher into a 0.1-0.5B student): AdamW with warm-up and cosine decay, 1024-token sequences,
# 64 sequences (64k tokens) a step over all processes, the teacher's top 128 tokens (verl's and axolotl's default).
RECIPES = {}
RECIPES["lm"] = dict(
    teacher=None, student=None, teacher_weights=None, seq_len=1024, topk=128, epochs=1, batch_size=8,
    tokens_per_step=65536, optimizer="adamw", lr=1e-4, momentum=0.9, nesterov=False, weight_decay=0.1,
    decay_norm_and_bias=False, schedule="cosine", milestones=(), lr_decay=0.1, lr_warmup_epochs=0.05,
    warmup_lr=0.0, min_lr=1e-5, compile_mode="default", log_every=20,
    loss=DistillConfig(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=1.0, rank_weight=1.0, rank_k=1.0),
)
# The demo: the Python standard library's sources as the corpus, a byte-level BPE of 8k tokens trained on them, the
# zoo's GPT-2-layout teacher (4 x 256) trained first and cached, then the student (2 x 128) distilled from it; a few
# minutes on a 2-core CPU.
RECIPES["demo"] = {
    **RECIPES["lm"], "teacher": "gpt-demo-teacher", "student": "gpt-demo-student", "seq_len": 128, "topk": 32,
    "batch_size": 16, "tokens_per_step": None, "epochs": 2, "lr": 3e-3, "lr_warmup_epochs": 0.1, "min_lr": 3e-4,
    "weight_decay": 0.01, "log_every": 20,
}
RECIPES["demo-teacher"] = {**RECIPES["demo"], "student": "gpt-demo-teacher", "teacher": None, "epochs": 2,
                           "loss": DistillConfig(method="ce")}

OPTIONS = (
    Option("data", "data", group="run", default="demo",
           help="comma-separated .txt / .jsonl files or folders of them, or 'demo' (the Python standard library's "
                "sources)"),
    Option("tokenizer", "data", group="run", optional=True,
           help="the tokenizer (a folder or hub name); default: the teacher's folder, the demo's own for zoo models"),
    Option("val_fraction", "data", type=float, above=0, below=1, default=0.05, group="run",
           help="share of the documents held out for validation (default 0.05)"),
    Option("seq_len", "data", type=int, low=2, group="recipe", help="tokens per sequence"),
    Option("tokens_per_step", "optim", type=int, low=2, optional=True, group="recipe",
           help="tokens per optimizer step over all processes: sets --global-batch-size to this / --seq-len"),
    Option("topk", "lm", type=int, low=2, group="recipe",
           help="the teacher's top-K tokens per position that KD and the ranking loss compare (default 128)"),
    Option("teacher_topk", "lm", optional=True, group="run",
           help="train from a dump of the teacher's top-K (a folder --dump-teacher-topk wrote) instead of running the "
                "teacher"),
    Option("dump_teacher_topk", "lm", optional=True, identity=False, group="run",
           help="write the teacher's top-K of every train and validation sequence into this folder, then stop"),
)
METHODS = ("ce", "kd", "kd+rank")
IGNORE_INDEX = text.IGNORE_INDEX
# The demo's corpus: 1.2 MB of the standard library's sources, about 0.3M tokens, which a 2-core CPU trains the demo's
# teacher and student on in a few minutes.
DEMO_CORPUS_BYTES = 1_200_000
# Positions per chunk of the evaluation's logits: (chunk x vocabulary) floats at a time, never all positions at once.
EVAL_CHUNK = 1024


def _is_zoo(name):
    return name in lm_zoo.ZOO


class LMTask(Task):
    name = "lm"
    description = __doc__.split("\n\n")[0]
    recipes = RECIPES
    own_options = OPTIONS
    methods = METHODS
    methods_help = ("ce: cross-entropy alone; kd: + KD over the teacher's top-K; kd+rank: + the Kendall ranking loss "
                    "over the top-K (gamma = the CE weight; --rank-weight overrides it)")
    primary_metric = "val_ppl"
    greater_is_better = False
    summary_metrics = (("perplexity", "val_ppl", "teacher_ppl"), ("top-1 agree %", "val_agreement",
                                                                  "teacher_agreement"))
    unit = "tok"

    def recipe(self, args, name=None):
        name = name or ("demo" if args.data == "demo" else "lm")
        recipe = dict(RECIPES[name])
        tokens = args.tokens_per_step or recipe["tokens_per_step"]
        if tokens is not None and args.global_batch_size is None and args.batch_size is None:
            seq_len = args.seq_len or recipe["seq_len"]
            if tokens % seq_len:
                raise ValueError(f"--tokens-per-step {tokens} is not a multiple of --seq-len {seq_len}")
            recipe["global_batch_size"] = tokens // seq_len
        # The lr is stated for the recipe's own batch: a batch set on the command line keeps it (no linear scaling,
        # which does not hold for AdamW on language models).
        recipe["lr_reference_batch"] = args.global_batch_size or recipe.get("global_batch_size") or (
            (args.batch_size or recipe["batch_size"]))
        return name, recipe

    def check(self, values, env):
        data = values["data"]
        if data != "demo":
            for path in data.split(","):
                if not Path(path).expanduser().exists():
                    raise ValueError(f"--data {path!r}: no such file or folder (give .txt / .jsonl files or folders "
                                     "of them, comma-separated, or 'demo')")
        for role in ("student", "teacher"):
            name = values[role]
            if name is not None and not _is_zoo(name) and not Path(name).expanduser().is_dir() and data == "demo":
                raise ValueError(f"--{role} {name!r}: the demo trains zoo models ({', '.join(lm_zoo.ZOO)}); give "
                                 "--data for models of your own")
        if values["teacher_topk"] is not None:
            if values["dump_teacher_topk"] is not None:
                raise ValueError("--teacher-topk and --dump-teacher-topk: give one (a dump is written from the "
                                 "teacher, then read by the runs that train from it)")
            if not Path(values["teacher_topk"]).is_dir():
                raise ValueError(f"--teacher-topk {values['teacher_topk']!r}: no such folder (write one with "
                                 "--dump-teacher-topk)")
            if values["loss"].method == "ce" and not values["loss"].rank_weight:
                raise ValueError("--teacher-topk with --method ce: the cross-entropy alone reads no teacher")
        teacher = values["teacher"]
        if teacher is not None and values["teacher_weights"] is None and not _is_zoo(teacher):
            values["teacher_weights"] = "pretrained"  # a folder or hub name holds its weights
        self._check_context(values)

    def _check_context(self, values):
        """--seq-len within each model's context, and the same vocabulary size in both (models of the zoo take theirs
        from the tokenizer), from the models' configs alone."""
        vocabularies = {}
        for role in ("student", "teacher"):
            name = values[role]
            if name is None:
                continue
            if _is_zoo(name):
                context = lm_zoo.ZOO_CONTEXT
            else:
                from transformers import AutoConfig

                try:
                    config = AutoConfig.from_pretrained(name)
                except (OSError, ValueError) as error:
                    raise ValueError(f"--{role} {name!r}: not a zoo model ({', '.join(lm_zoo.ZOO)}) nor a model "
                                     f"folder or hub name: {str(error).splitlines()[0]}") from None
                context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                vocabularies[role] = config.vocab_size
            if context is not None and values["seq_len"] > context:
                raise ValueError(f"--seq-len {values['seq_len']} is beyond the {role} {name!r}'s context of "
                                 f"{context} positions")
        if len(vocabularies) == 2 and vocabularies["student"] != vocabularies["teacher"]:
            raise ValueError(f"--student {values['student']!r} has a vocabulary of {vocabularies['student']} tokens, "
                             f"--teacher {values['teacher']!r} {vocabularies['teacher']}: the student must share the "
                             "teacher's tokenizer and vocabulary")

    # ------------------------------------------------------------------------------------------------------------------
    # Data.

    def tokenizer(self, cfg):
        data = cfg.data
        cache = check_writable(default_cache_dir(), "the cache folder ($RANKKD_CACHE)")
        if data.tokenizer is not None:
            return text.load_tokenizer(data.tokenizer)
        if data.data == "demo" or all(_is_zoo(name) for name in (cfg.model.student, cfg.model.teacher)
                                      if name is not None):
            return text.train_demo_tokenizer(text.demo_documents(DEMO_CORPUS_BYTES), cache / "lm-demo-tokenizer")
        return text.load_tokenizer(cfg.model.teacher or cfg.model.student)

    def sequences(self, cfg, tokenizer):
        """The packed train and validation sequences of the run's data."""
        data = cfg.data
        documents = (text.demo_documents(DEMO_CORPUS_BYTES) if data.data == "demo"
                     else text.read_documents(data.data.split(",")))
        corpus = text.tokenize_documents(documents, tokenizer, default_cache_dir() / "lm-tokens")
        train, val = text.split_documents(corpus, data.val_fraction)
        return corpus, text.PackedSequences(train, data.seq_len), text.PackedSequences(val, data.seq_len)

    def make_data(self, cfg, env):
        tokenizer = self.tokenizer(cfg)
        corpus, train, val = self.sequences(cfg, tokenizer)
        stores = {"train": None, "validation": None}
        if cfg.lm.teacher_topk is not None:
            for split, sequences in (("train", train), ("validation", val)):
                expected = manifest_fields(cfg, tokenizer, corpus, split, len(sequences))
                stores[split] = TopKStore(Path(cfg.lm.teacher_topk) / split, expected)
        common = dict(rank=env.rank, world_size=env.world_size, device=env.device)
        return TaskData(
            train=SequenceTrainLoader(train, batch_size=cfg.optim.batch_size, seed=cfg.job.seed,
                                      topk=stores["train"], **common),
            val=SequenceValLoader(val, batch_size=cfg.optim.batch_size, topk=stores["validation"], **common),
            num_classes=len(tokenizer), backend="tokens" + (" + teacher top-K dump" if stores["train"] else ""))

    # ------------------------------------------------------------------------------------------------------------------
    # Models.

    def build_student(self, cfg, num_classes):
        return lm_zoo.load_causal_lm(cfg.model.student, vocab_size=num_classes)

    def runs_teacher(self, cfg):
        return cfg.model.teacher is not None and cfg.lm.teacher_topk is None

    def load_teacher(self, cfg, weights, num_classes):
        name = cfg.model.teacher
        teacher = lm_zoo.load_causal_lm(name, vocab_size=num_classes)
        if _is_zoo(name) and weights != "random":
            teacher.load_state_dict(read_checkpoint_weights(weights))
        return teacher.eval().requires_grad_(False)

    def train_forward(self, student, teacher, cfg):
        loss = cfg.loss
        fused = FusedLinearDistillLoss(ce_weight=loss.ce_weight, kd_weight=0.0 if loss.method == "ce" else
                                       loss.kd_weight, rank_weight=loss.rank_weight, temperature=loss.temperature,
                                       k=loss.rank_k)
        if teacher is not None:
            lm_zoo.check_pair(student, teacher)
        return LMDistiller(student, teacher, fused, top_k=cfg.lm.topk)

    def batch_units(self, inputs, targets):
        return (targets != IGNORE_INDEX).sum()

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation.

    @torch.no_grad()
    def evaluate(self, student, teacher, loader, autocast, env, cfg):
        """Validation loss and perplexity of student (and teacher), the share of positions where the student's top
        token is the teacher's, and the mean Kendall tau-b between the student's logits and the teacher's over the
        teacher's top-K, over every counted position of the validation split."""
        sums = torch.zeros(6, dtype=torch.float64, device=env.device)
        top_k = cfg.lm.topk
        for inputs, labels in loader:
            with autocast():
                hidden = lm_zoo.final_hidden(student, inputs["input_ids"])
                teacher_hidden = (lm_zoo.final_hidden(teacher, inputs["input_ids"]) if teacher is not None
                                  else None)
            counted = labels != IGNORE_INDEX
            hidden, target = hidden[counted], labels[counted]
            stored = (inputs["teacher_ids"][counted], inputs["teacher_logits"][counted]) if (
                "teacher_ids" in inputs) else None
            teacher_hidden = teacher_hidden[counted] if teacher_hidden is not None else None
            for start in range(0, len(target), EVAL_CHUNK):
                rows = slice(start, start + EVAL_CHUNK)
                logits = _logits(student, hidden[rows])
                sums[0] += len(logits[:, 0])
                sums[1] += torch.nn.functional.cross_entropy(logits, target[rows], reduction="sum")
                if teacher_hidden is not None:
                    teacher_logits = _logits(teacher, teacher_hidden[rows])
                    sums[2] += torch.nn.functional.cross_entropy(teacher_logits, target[rows], reduction="sum")
                    top_logits, top_ids = teacher_logits.topk(top_k, dim=-1)
                elif stored is not None:
                    top_ids, top_logits = stored[0][rows], stored[1][rows]
                else:
                    continue
                teacher_top1 = top_ids.gather(1, top_logits.argmax(-1, keepdim=True)).squeeze(1)
                sums[3] += (logits.argmax(-1) == teacher_top1).sum()
                tau = kendall_tau(logits.gather(1, top_ids), top_logits.float())
                sums[4] += tau.nansum()
                sums[5] += tau.isfinite().sum()
        positions, loss, teacher_loss, agree, tau_sum, tau_rows = all_reduce_sum(sums).tolist()
        has_teacher_model, has_teacher = teacher is not None, teacher is not None or cfg.lm.teacher_topk is not None
        return {"val_loss": loss / positions, "val_ppl": math.exp(loss / positions),
                "val_agreement": 100 * agree / positions if has_teacher else None,
                "val_tau": tau_sum / tau_rows if has_teacher and tau_rows else None,
                "teacher_loss": teacher_loss / positions if has_teacher_model else None,
                "teacher_ppl": math.exp(teacher_loss / positions) if has_teacher_model else None,
                "teacher_agreement": 100.0 if has_teacher else None}


def _logits(model, hidden):
    weight, bias = lm_zoo.lm_head(model)
    logits = hidden.float() @ weight.float().T
    return logits + bias.float() if bias is not None else logits


# ----------------------------------------------------------------------------------------------------------------------
# The offline teacher: its top-K written once, read by every student run that trains from it.


def manifest_fields(cfg, tokenizer, corpus, split, num_sequences):
    """What a dump must hold to serve the run with settings `cfg`: the same teacher, tokenizer, data, split, K and
    sequence length (the teacher's weights are checked by their digest when the dump is written)."""
    return {"teacher": cfg.model.teacher, "tokenizer_digest": text.tokenizer_digest(tokenizer),
            "data_digest": f"{corpus.key}-{split}-val{cfg.data.val_fraction}", "k": cfg.lm.topk,
            "seq_len": cfg.data.seq_len, "num_sequences": num_sequences}


def main(argv=None):
    """train/lm.py: the trainer, or with --dump-teacher-topk the dump of the teacher's top-K."""
    args = make_parser(TASK).parse_args(argv)
    if args.dump_teacher_topk is None:
        return trainer.main(TASK, argv)
    try:
        env = init_distributed(args.device)
        cfg = resolve_config(TASK, args, env)
        dump(cfg, env)
    except ValueError as error:
        trainer.stop(f"lm.py: error: {error}", 2)
    except KeyboardInterrupt:
        trainer.stop("lm.py: interrupted: the shards written so far are kept; the same command continues the dump.",
                     130)
    cleanup_distributed()


def dump(cfg, env):
    """The teacher's top-K of every train and validation sequence into DIR/train and DIR/validation (float16
    logits), resumable shard by shard; written by rank 0 (one writer per folder)."""
    if cfg.model.teacher is None or cfg.model.teacher_weights is None:
        raise ValueError("--dump-teacher-topk needs a --teacher with its weights (a model folder, a hub name, or a "
                         "zoo model with --teacher-weights)")
    tokenizer = TASK.tokenizer(cfg)
    corpus, train, val = TASK.sequences(cfg, tokenizer)
    if env.is_main:
        seed_everything(cfg.job.seed)  # a "random" teacher is the one the trainer builds
        teacher = TASK.load_teacher(cfg, cfg.model.teacher_weights, len(tokenizer)).to(env.device)
        for split, sequences in (("train", train), ("validation", val)):
            manifest = TopKManifest(**manifest_fields(cfg, tokenizer, corpus, split, len(sequences)),
                                    teacher_digest=lm_zoo.weights_digest(teacher), logits_dtype="float16",
                                    shard_size=1024)
            batches = ((torch.arange(start, min(start + cfg.optim.batch_size, len(sequences))),
                        torch.stack([sequences[i]["input_ids"] for i in range(start, min(start + cfg.optim.batch_size,
                                                                                          len(sequences)))]).to(
                            env.device)) for start in range(0, len(sequences), cfg.optim.batch_size))
            with TopKWriter(Path(cfg.lm.dump_teacher_topk) / split, manifest) as writer:
                dump_teacher_topk(teacher, batches, writer)
            print(f"{split}: the teacher's top-{cfg.lm.topk} of {len(sequences)} sequences of {cfg.data.seq_len} "
                  f"tokens in {Path(cfg.lm.dump_teacher_topk) / split}")
    barrier()


TASK = LMTask()
