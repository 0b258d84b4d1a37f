"""Cluster mode (issue 19): several relays behind one address, any of them answering for any call.

Sans-I/O where it can be, one owner per module:
- ids.py: call ids that name the node (RELAY_NODE_ID) and the worker that own a call;
- signing.py: the HMAC (RELAY_CLUSTER_SECRET) over a request one relay forwards to another, and its check;
- peers.py: where a node is reached (the registry's entry, else RELAY_PEER_URL_TEMPLATE);
- registry.py: each relay's heartbeat in Redis (address, serving or draining, calls, capacity);
- store.py: the Redis client (RELAY_REDIS_URL: short timeouts, no retry storms) and what its failures count as;
- limits.py, single_use.py, transcripts.py: the state the relays share through Redis;
- metrics.py: the cluster's Prometheus metrics.
The HTTP side (forwarding a request to its call's node, trusting a signed one) is relay/server/cluster.py's; the
heartbeat and transcript tasks are relay/server/cluster_tasks.py's.
"""
