"""Tests of sidecar/security."""
