"""File ingest: walk photo roots, sniff and decode files safely, and the decode worker processes. Torch-free."""
