"""relay: a WebRTC relay between clients and Realtime speech-to-speech models."""

# Semantic versioning; each release is described in CHANGELOG.md.
__version__ = "0.2.0"
