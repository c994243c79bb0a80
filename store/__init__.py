"""The embedding cache and the text-tower artifact: everything one stage writes and another reads."""
