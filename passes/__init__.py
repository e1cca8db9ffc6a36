"""edgeopt.passes."""
