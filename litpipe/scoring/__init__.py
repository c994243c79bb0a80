"""The scoring library: zero-shot and retrieval metrics as CLIP_benchmark defines them, faiss search, and
the eval suite. The eval stage, evaluation during training and `litpipe serve` all call it, so every
number is computed one way. A change to recall@k goes here (`metrics.py`), never into a stage."""
