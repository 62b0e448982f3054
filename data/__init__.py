"""Data for tess2: the on-disk format (shards.py), the chat template (chat.py) and prepare scripts."""
