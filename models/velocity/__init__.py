"""Velocity models: a human velocity for each note, from the notes alone.

================  ================================================================================
``features``      note features of the past (and, for context models, the future); live and file
``causal``        the causal GRU (live, zero lookahead) and ``NumpyCausalStep``, its CPU form
``context``       causal backbone + a horizon-masked attention readout (lookahead, offline)
``refine``        the offline refiner: a bidirectional GRU over the whole piece (files only)
``unet``          the CMMR 2025 U-Net piano-roll colorizer, re-implemented (the baseline)
``weights``       loading and saving ``velocity_<name>.safetensors`` + ``.json``
``data``          MAESTRO preprocessed into compact arrays
``train``         training of causal and context models
``train_unet``    training and evaluation of the U-Net (through ``cadenza train|eval velocity``)
``evaluate``      ``cadenza eval velocity``: MAESTRO error tables beside the published figures
``colorize``      ``cadenza colorize`` and ``cadenza bench colorize``: files, many at once
``cli``           the ``train``/``eval``/``colorize``/``bench`` subcommands of this package
================  ================================================================================
"""
