"""What every stage shares: the project error, atomic file writes, token ids with a meaning, device and precision,
distributed (DDP) helpers.
"""
