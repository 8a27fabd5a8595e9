"""The mail side: folder names, MIME, the IMAP adapter, the import pipeline, Sieve rules."""
