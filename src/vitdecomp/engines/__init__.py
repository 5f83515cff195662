"""Decomposition engines, one per architecture shape (isotropic ViT, ...)."""
