"""Torch compositions of the ops, organised for speed (the CPU backend; they run on any device)."""
