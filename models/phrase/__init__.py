"""Phrase models: continuing what was just played, or generating from nothing.

===============  =================================================================================
``tokens``       event tokens (note-on, note-off, time shift, velocity, sustain), appendable live
``model``        the decoder-only transformer (absolute or rotary positions; a rotary ring KV cache
                 slides past the context without re-encoding) with a style vector
``lstm``         the LSTM baseline, Performance RNN style, over the same tokens
``static``       the one-token decode step with static shapes (a CUDA graph on CUDA), N rows
``live``         ``LivePhrase``: feed what is played, answer when asked (guard rails included)
``answer``       the rules every answering row samples by, and best-of-N over short horizons
``relatedness``  how an answer relates to its call (key, register, density, pace): scores, guards
``worker``       the phrase model as a handler of the model runtime
``ngram``        the interpolated Witten-Bell n-gram baseline over the same tokens
``data``         MAESTRO (and POP909) tokenized once into cached arrays; training windows
``train``        ``cadenza train phrase``: resumable, a token budget, every run recorded
``evaluate``     ``cadenza eval phrase``: likelihood of the model, the LSTM and the n-gram
``calls``        the generation study: prompts, answers, overlap and call-relatedness
``report``       ``eval phrase --report``: the eval-midi report of the study's answers
``nll_files``    ``eval phrase --files DIR``: NLL on any folder of performances
``files``        ``cadenza continue`` and ``cadenza generate`` on MIDI files
``bench``        ``cadenza bench continue``: tokens/s, KV cache vs none, time to first note
``cli``          the subcommands of this package
===============  =================================================================================
"""
