"""Moving MIDI events in time: the live engine, its stages, ports, sinks and the service.

===================  =========================================================================
``engine``           the asyncio engine: input queue, pump, per-channel state, ledger, panic
``build``            builds an engine, its stages and sinks from the settings
``velocity_stage``   the velocity of each note-on (modes, controls, deadline, fallback)
``phrase``           ``PhraseStage``: call and response around the phrase model
``lookahead``        DAW mode: output delayed by exactly S seconds, the model hears the future
``scheduler``        timestamped output, cancellable by tag (answers, lookahead)
``ports``            MIDI ports through python-rtmidi: backends, virtual or attached, polling
``spin``             the busy-polling event loop (``engine.busy_poll``)
``serve``            ``cadenza serve``: ports around the engine, signals, supervision, summary
``sources``          non-port sources: file replay, recorder
``metrics``          preallocated counters and latency histograms
``audio``            FluidSynth: the synth, offline rendering
``audio_cli``        ``cadenza render``
``cli``              ``cadenza ports`` and ``cadenza serve`` arguments
``sinks/``           where output goes: the ``Sink`` protocols, audio sinks
``mqtt/``            the headless daemon, the bridge and their client plumbing
===================  =========================================================================
"""
