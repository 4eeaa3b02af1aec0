"""MSC4140 cancellable delayed events for any Matrix homeserver, as a sidecar."""
