"""Models: the encoder Protocol and its backends, model specs, training, caption datasets and the sample library.

Importing this package is cheap; torch and open_clip load only when a torch backend or training is used.
"""
