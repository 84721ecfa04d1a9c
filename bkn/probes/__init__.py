"""Probes: command-line studies of the norms (accuracy of statistics, training)."""
