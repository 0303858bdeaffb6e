"""Stage 2: the VLM post-classifier (loading, candidate scoring, streamed reasoning) and its versioned prompts."""
