"""Phrase models."""
