"""Jobs that write or check a converted directory: convert, verify, repair, upgrade."""
