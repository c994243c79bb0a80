"""Zero-shot classification and image-text retrieval on cached embeddings."""
