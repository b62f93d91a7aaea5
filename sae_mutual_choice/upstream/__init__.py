"""Layer 1, the SAELens pull request: ``adaptive_allocation`` (what Mutual and Feature Choice share),
``mutual_choice_sae`` and ``feature_choice_sae``, in SAELens's layout and style.

They import only torch, SAELens and each other: nothing here knows of ranks, sparse steps or host
reads (:mod:`sae_mutual_choice.fast` subclasses these classes with them), nor of the command line
(:mod:`sae_mutual_choice.app`). ``sae-mc upstream-patch`` rewrites their imports to ``sae_lens.saes``.
"""
