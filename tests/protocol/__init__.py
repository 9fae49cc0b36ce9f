"""Tests of sidecar/protocol."""
