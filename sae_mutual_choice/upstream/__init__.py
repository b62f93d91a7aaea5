"""Layer 1, the code meant for SAELens: the allocation rules, capacities, ``aux_zipf_loss`` and the exact
threshold calibration, as SAELens would hold them.

It imports only torch, SAELens and itself: nothing here knows of ranks, sparse steps or host reads
(:mod:`sae_mutual_choice.fast` builds those on it), nor of the command line (:mod:`sae_mutual_choice.app`).
"""
