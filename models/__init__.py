"""Turning musical context into velocities and notes.

=============  ===================================================================================
``runtime``    the model runtime: owns model state off the event loop, batches across sessions,
               answers by deadline (thread on a GPU, inline on a CPU)
``velocity/``  velocity models: causal (live), context (lookahead, offline), offline refiner,
               U-Net baseline; features, training, evaluation, ``cadenza colorize``
``phrase/``    phrase continuation: event tokens, the KV-cached transformer, the n-gram baseline,
               training, evaluation, ``cadenza continue`` / ``generate``
``vae/``       MusicVAE melody models (``cadenza vae ...``)
``weights/``   the shipped weights: ``<name>.safetensors`` with ``<name>.json`` (config, training
               commands and history) beside each
=============  ===================================================================================
"""
