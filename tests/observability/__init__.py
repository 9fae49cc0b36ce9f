"""Tests of sidecar/observability."""
