"""cnnlab: run, compare and look inside CNN experiments on image classification data.

Usage: ``cnnlab run configs/lenet.yaml`` (see ``cnnlab --help``).
"""

__version__ = "0.1.0"
