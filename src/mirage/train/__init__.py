"""Training mirage's own small UNets (course Part B): data, model, loop, run folders, the CLI."""
