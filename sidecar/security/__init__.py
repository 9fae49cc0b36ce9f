"""Who may use the sidecar, over what channel, and how much."""
