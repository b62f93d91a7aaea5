"""Layer 3, the application: the ``sae-mc`` command line, the embedded model and corpus, comparisons,
evaluation and reports. It may import both layers below it; nothing imports it but the command line.
"""
