"""edgeopt.backends."""
