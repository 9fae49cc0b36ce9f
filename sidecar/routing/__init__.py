"""Which target serves a request for a public model name."""
