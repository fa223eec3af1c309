"""Deployment side: export, calibration, engine bundles, backends, Segmenter, profile, runner.

No torch at run time; only deploy.export imports it (lazily).
"""

__all__ = ["Segmenter"]


def __getattr__(name):
    # Lazy, so that `import liverkd.deploy.bundle` stays light; neither path imports torch.
    if name == "Segmenter":
        from liverkd.deploy.segment import Segmenter

        return Segmenter
    raise AttributeError(f"module 'deploy' has no attribute {name!r}")
