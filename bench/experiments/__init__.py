"""Experiments behind `python -m bench run`: arguments, plans, runs, reports."""
