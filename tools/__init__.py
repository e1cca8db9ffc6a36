"""edgeopt.tools."""
