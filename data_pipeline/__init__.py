"""trellis data_pipeline."""
