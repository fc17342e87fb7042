"""Data, models, training and evaluation for genrec."""
