"""The cursor store: saved positions, leases, gaps and findings, on SQLite or PostgreSQL (``base.open_store``).

``records`` holds what it keeps, ``base`` the protocol and the factory, ``schema`` the tables, ``core`` and one
module per table the SQLAlchemy calls, ``backends`` the two dialects, and ``sql`` the database plumbing the
store shares with the SQL mirror sink.
"""
