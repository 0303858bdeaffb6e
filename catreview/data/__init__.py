"""Data: the database schema, photos on disk, breed labels, folder import and the append-only review history."""
