"""trellis rl."""
