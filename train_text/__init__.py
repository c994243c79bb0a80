"""Train a text tower against cached image embeddings with a global contrastive loss."""
