"""Storage: the versioned SQL catalog (the source of truth), the FAISS vector store with its manifests,
annotations (tags, caption collections) and the filters that select photos."""
