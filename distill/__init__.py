"""Training side (torch): models, losses, GTAN, the training loop and the pipeline."""
