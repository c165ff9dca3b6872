"""Pruning (issue 17)."""
