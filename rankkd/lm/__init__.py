"""Causal language-model distillation: text data, models and the teacher's offline top-K."""
