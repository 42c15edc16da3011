"""dbscale: train a residual network as B independent DiffusionBlocks jobs under DeepSpeed."""

__version__ = "0.1.0"
