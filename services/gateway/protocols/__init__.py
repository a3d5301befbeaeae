"""Client protocols on the gateway: Moshi's binary WebSocket protocol and OpenAI Realtime events."""
