"""trellis parallel."""
