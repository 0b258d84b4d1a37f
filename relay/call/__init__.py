"""A call's adapter: one client's peer connection tied to one upstream conversation, around the sans-I/O core.

One owner per connection, each with a narrow interface (docs/architecture.md follows a frame and an event through
them): call.py (the Call, which composes the others), peer.py (the client), upstream.py (the model), records.py
(transcript and recording), fanout.py (the call's events to its listeners), tools.py, tasks.py, meter.py.
Nothing here knows of HTTP: relay/server makes calls from requests.
"""
