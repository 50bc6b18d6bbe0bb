"""Cadenza: a real-time MIDI companion that colorizes velocities and continues phrases."""

__version__ = "0.1.0"
