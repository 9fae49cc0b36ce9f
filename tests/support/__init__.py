"""Helpers the tests share: fake services on loopback, the sidecar as a process, token issuers."""
