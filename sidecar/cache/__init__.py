"""Response cache: exact-match answers for deterministic requests, per tenant."""
