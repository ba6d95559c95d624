"""The C part of the featurizer: compiled with gcc on first use, loaded through ctypes."""
