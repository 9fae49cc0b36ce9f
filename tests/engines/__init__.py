"""Tests of sidecar/engines."""
