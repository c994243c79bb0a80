"""The models every stage shares: the locked image encoder, the text tower and its tokenizer."""
