"""Tests of sidecar/backends."""
