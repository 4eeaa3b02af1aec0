"""Replaying delayed events to the homeserver, as the user who scheduled them."""
