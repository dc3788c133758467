"""Evaluation of generated images (the shapes demo's pixel checker)."""
