"""The WebSocket leg to a Realtime endpoint (OpenAI, Azure OpenAI, the simulator, any compatible service)."""
