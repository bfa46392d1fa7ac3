"""The model-stitching study: the affine maps and their training, its grid, layer matching,
probes and steering through a stitch, and the structural/semantic feature classes."""
