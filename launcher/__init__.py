"""trellis launcher: the CLI, config loading and job entry points."""
