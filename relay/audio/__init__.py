"""Audio conversion between the WebRTC side (48 kHz, Opus) and the Realtime API (24 kHz mono PCM16)."""
