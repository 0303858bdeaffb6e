"""Compare: two VLM profiles or adapter versions side by side, aggregates and blind preferences."""
