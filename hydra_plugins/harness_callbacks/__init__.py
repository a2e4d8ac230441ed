"""Hydra callbacks of the harness app (see sweep_summary.py); they live outside harness/ because they print
through the leaderboard's table formatter."""
