"""MQTT: the headless daemon's sessions, and the thin bridge on a performer's machine.

A GPU box runs ``cadenza serve --transport mqtt``; each performer runs ``cadenza bridge
--session NAME`` beside their keyboard and synth. The broker (Mosquitto, or a cluster of them)
is the only thing both sides talk to, so boxes scale out behind it without a protocol of our own.

Topics (``PREFIX`` is ``mqtt.topic_prefix``, default ``cadenza``; SESSION is 1–64 characters
from ``A-Z a-z 0-9 _ . -``, not starting with ``_``)::

    PREFIX/SESSION/in      bridge -> daemon   MIDI the performer played
    PREFIX/SESSION/out     daemon -> bridge   what the engine made of it (colorized notes, CCs...)
    PREFIX/SESSION/bye     bridge -> daemon   the bridge left (also its MQTT will): release the
                                              session's notes and forget its state
    PREFIX/_daemon/ID/status   retained, repeated: ``{"state": "online", "capacity": C, "at": T}``,
                               ``draining``, or ``offline`` (the daemon's will); daemons and
                               bridges pick each session's owner from these (``ownership``)
    PREFIX/_daemon/ID/stats    the daemon's metrics as JSON, every ``engine.stats_interval_s``

Every ``in`` and ``out`` payload is raw MIDI: one or more complete messages, each with its status
byte (no running status), in order — ``mosquitto_pub -t cadenza/me/in -m ...`` can play a note.
The daemon stamps messages on arrival, so timing as the model sees it includes the network's
jitter (well under a millisecond on a LAN). Malformed stretches, unknown topics, oversized
payloads and sessions over the limit are dropped and counted, never fatal.

Modules: ``client`` (connect, TLS and credentials, outbox, session names), ``daemon``
(``serve_mqtt`` and the sessions' transport), ``bridge`` (``run_bridge``), ``ownership`` (which
daemon answers which session), ``limits`` (per-session rate limits).
"""
