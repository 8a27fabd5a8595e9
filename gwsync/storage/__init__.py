"""gwsync's own SQLite files: opening them safely, schema migrations, the sync state store."""
