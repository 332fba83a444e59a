"""Masks, channel units and the DNR rewiring step."""
