"""Chaos suite: the whole system as separate processes under faults (marker `chaos`)."""
