"""Tests of sidecar/api."""
