"""Sections of the GPU check (bench/gpu_check.py)."""
