"""Peer reference implementations transcribed for cross-checks (see each module for source and licence)."""
