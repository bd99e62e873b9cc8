"""Examples that use jna (run from the repository root, e.g.
``python -m examples.nat_classifier.train``). Not part of the installed package."""
