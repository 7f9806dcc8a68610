"""trellis cluster."""
