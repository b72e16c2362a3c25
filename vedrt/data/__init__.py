"""Data sources for training and evaluation: synthetic scenes and users' captioned folders."""
