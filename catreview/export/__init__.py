"""Exports: LLaVA/TRL conversations from reviews and curated, versioned dataset folders."""
