"""clipsearch indexer: scan → decode → embed → write. Owns the encoder, the catalog schema and the vector store."""
