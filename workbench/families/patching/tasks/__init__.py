"""The family's registered analyses: each runs the engine on a suite and saves its result."""
