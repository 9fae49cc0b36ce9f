"""Where answers come from: upstream providers and local engines, behind one interface."""
