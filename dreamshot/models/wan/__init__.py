"""Wan2.1 backbone: the only package that imports diffusers' / transformers' Wan classes."""
