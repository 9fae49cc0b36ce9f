"""Tests of sidecar/cache."""
