"""The few exceptions Cadenza raises on purpose.

Each carries a message a musician can act on; the CLI prints it as one line and exits non-zero.
Anything else escaping to the top level is a bug.
"""


class CadenzaError(Exception):
    """Base class: bad input or an environment problem, reported as one line."""

    exit_code = 2


class ConfigError(CadenzaError):
    """A configuration value is invalid."""


class MidiFileError(CadenzaError):
    """A MIDI file is missing, corrupt or not a MIDI file."""


class PortError(CadenzaError):
    """A MIDI port cannot be found or opened, or no MIDI backend is available."""


class ModelError(CadenzaError):
    """Model weights are missing or do not match their config."""


class AudioError(CadenzaError):
    """No SoundFont, or the audio device cannot be opened."""


class OutputError(CadenzaError):
    """An output file cannot be written (nothing is left under its name)."""


class BrokerError(CadenzaError):
    """The MQTT broker cannot be reached."""
