"""Phrase models: continuing what was just played, or generating from nothing.

============  ====================================================================================
``tokens``    event tokens (note-on, note-off, time shift, velocity, sustain), appendable live
``model``     the decoder-only transformer with a preallocated KV cache and a style vector
``live``      ``LivePhrase``: feed what is played, answer when asked (guard rails included)
``ngram``     the interpolated Witten-Bell n-gram baseline over the same tokens
``data``      MAESTRO (and POP909) tokenized once into cached arrays; training windows
``train``     ``cadenza train phrase``
``evaluate``  ``cadenza eval phrase``: likelihood and generation statistics
``files``     ``cadenza continue`` and ``cadenza generate`` on MIDI files
``bench``     ``cadenza bench continue``: tokens/s, KV cache vs none, time to first note
``cli``       the subcommands of this package
============  ====================================================================================
"""
