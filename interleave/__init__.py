"""Interleave schedules (pure Python)."""
