"""trellis model."""
