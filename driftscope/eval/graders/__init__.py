"""Graders: one module per answer format; each turns a response and a gold into a score in [0, 1]."""
