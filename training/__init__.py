"""Training the two-tower model on MovieLens-100K: data, split protocol, loop, evaluation, export."""
