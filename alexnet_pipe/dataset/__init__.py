"""The converted directory: its layout, manifest, completion records, checksums, means, records."""
