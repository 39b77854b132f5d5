"""Common package of the two-tower serving system: model, codec, errors, server bootstrap."""
