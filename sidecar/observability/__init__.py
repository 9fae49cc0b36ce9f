"""Timing, logging and metrics."""
