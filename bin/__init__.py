"""Cadenza: a real-time MIDI companion that colorizes velocities and continues phrases.

This folder (``bin/``) is the ``cadenza`` package itself; the other folders install as its
subpackages (``cadenza.stream`` = ``stream/``, ``cadenza.models`` = ``models/``, ...).

=================  ===========================================================================
``cli``            the ``cadenza`` command: argument parsing and dispatch to each package's CLI
``demo``           ``cadenza demo``: the shipped excerpt through the live engine, no devices
``midifile``       standard MIDI files: ``Performance``, ``MidiFile`` (read, patch velocities,
                   append a track), ``write_performance``, VLQ and track-chunk helpers
``messages``       raw MIDI message kinds (``Kind``, ``classify``) and builders (``note_on`` ...)
``atomic``         outputs that are never half-written (``atomic_path``, ``write_atomic``)
``errors``         the project's exceptions, each a one-line message for the user
``plot``           piano-roll pictures coloured by velocity
``bench/``         ``cadenza bench latency|throughput|mqtt`` (``cadenza.bench``)
``harness/``       private JACK and Mosquitto servers for tests and benches (``cadenza.harness``)
``assets/``        the demo excerpt and its attribution
``quickstart``     the one-step installer: ``bash bin/quickstart demo|test``
=================  ===========================================================================
"""

__version__ = "0.1.0"
