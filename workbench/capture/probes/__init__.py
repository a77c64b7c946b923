"""The four phenomenon probes (lazy neurons, super experts, attention sinks, routing) and their registry."""
