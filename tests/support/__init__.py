"""What the suites share: paths and fixture audio, one way to wait for a condition, clients that speak
the gateway's protocols, opening a session without a gateway, and one harness that runs Chorus as real
processes (`stack.py`: from `chorus` service commands, or from the compose file's), plus `chorus up`
as a user runs it (`chorus_up.py`)."""
