"""Chorus services; each sub-package is one deployable service and imports no other."""
