"""relay: a WebRTC relay between clients and Realtime speech-to-speech models."""

__version__ = "0.1.0"
