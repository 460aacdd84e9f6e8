"""torchmerge.backends: deployment targets. `compile` holds the torch.compile backend ("torchmerge")."""
