"""Evaluation: a sandbox for untrusted programs, benchmark tasks, pass@k."""
