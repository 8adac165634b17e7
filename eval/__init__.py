"""Evaluation (installed as ``diffaccel.eval``): metrics, evaluation jobs, reports and plots."""
