"""The PostgreSQL backend of :mod:`newsletter.storage` (psycopg 3): several sender hosts,
the scheduler and the public pages sharing one database."""

from newsletter.storage.postgres.storage import PostgresStorage

__all__ = ["PostgresStorage"]
