"""Usage: ``python -m cnnlab run configs/lenet.yaml`` (same as the ``cnnlab`` command)."""

from cnnlab.entry import main

main()
