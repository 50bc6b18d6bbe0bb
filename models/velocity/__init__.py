"""Velocity models."""
