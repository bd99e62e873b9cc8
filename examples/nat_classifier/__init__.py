"""A small hierarchical NAT/DiNAT-style image classifier on jna's Flax (linen) modules.

`model`: the network (`NATClassifier`); `train`: synthetic data, the optax training loop and the
command line (``python -m examples.nat_classifier.train --help``). See README.md beside this file.
"""
