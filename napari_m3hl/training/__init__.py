"""The training loop as a generator of events, distributed glue and pseudo-label quality."""
