"""Queries: what the app and the CLI show for a photo and which photo comes next."""
