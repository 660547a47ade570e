"""The SQLite backend: one file, WAL mode, synchronous=FULL."""
