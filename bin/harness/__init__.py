"""Real servers for tests and benches, started privately and stopped again.

=============  ===================================================================================
``jack``       ``JackServer``: a JACK server with the dummy driver under its own server name,
               so virtual MIDI ports exist on a machine without a sound card
``mosquitto``  ``MosquittoBroker``: a Mosquitto broker on a free loopback port (TCP_NODELAY on)
=============  ===================================================================================
"""
