"""What was played: the state the engine keeps per channel, preallocated.

==============  ==================================================================================
``ledger``      the open-note ledger: every note-on that went out gets its note-off (panic)
``history``     a ring of the last N channel events
``pianoroll``   a sliding piano-roll window over live input (frames of ``engine.frame_ms``)
``clock``       MIDI clock: tempo estimate and bar position from 0xF8 ticks
==============  ==================================================================================
"""
