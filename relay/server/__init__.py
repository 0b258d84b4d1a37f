"""The relay's HTTP side: aiohttp app factory, routes and the serve loop."""
