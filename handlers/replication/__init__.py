"""ReplicatePackage (PROTOCOL.md §4): a driver package or an image made equal
to its source of truth over HTTP(S) -- only the files missing or different
fetched, a partial file resumed, every file verified, the package switched
into place atomically (docs/replication.md)."""
