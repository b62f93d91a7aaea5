"""Layer 2, the fast and distributed steps: the training SAEs as the plugin registers them, the sparse
training step, exact selection over data-parallel ranks, and the CPU's host-read shortcuts.

It builds on :mod:`sae_mutual_choice.upstream` and never imports :mod:`sae_mutual_choice.app`.
"""
