"""Chorus common code: settings, stream names, message schemas, the Redis bus, audio helpers."""
