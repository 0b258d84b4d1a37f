"""The aiortc side of a call: ICE settings, the inbound packet tap, the paced playout track."""
