"""Web: the public pages (one-click unsubscribe, undo, preferences) and the issue archive."""
