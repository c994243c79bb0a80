"""Zero-shot and retrieval metrics of a text tower against cached image embeddings: shared by the eval
stage and by evaluation during training, so both report the same numbers."""
