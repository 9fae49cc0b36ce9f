"""Tests of sidecar/routing."""
