"""Database records and the repositories that are the only place queries live."""
