"""Training side (liverkd.distill, torch): models, losses, objectives, GTAN, the training loop
and the pipeline. Evaluation goes through liverkd.core.inference, the path `liverkd infer` runs."""
