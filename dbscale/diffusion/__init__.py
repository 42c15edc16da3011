"""The DiffusionBlocks math (Shing et al., ICLR 2026), framework-free: no models, no DeepSpeed."""
