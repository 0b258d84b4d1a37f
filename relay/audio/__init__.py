"""The audio a call carries: Opus to and from 24 kHz mono PCM16 (the Realtime API's PCM), G.711 as it is, and the
framing of both."""
