"""The duplicate finder's default thresholds, apart from its numeric code so that the CLI's parser (which shows
them in `--help`) is built without importing numpy and FAISS (~0.3 s of every command's start-up)."""

DEFAULT_THRESHOLD = 0.90  # CLIP cosine floor of a model candidate (bench/duplicates.py: demo and random weights)
DEFAULT_PHASH_MAX = 6  # of 63 bits; copies measured mostly <= 4, distinct photos of one kind mostly >= 8 (bench)
