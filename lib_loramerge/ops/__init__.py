"""Merge modes (add / concat / svd), factor-space SVD and rank choice. No file I/O here."""
