"""Placeholder: the Triton kernel lands here (issue 3)."""
