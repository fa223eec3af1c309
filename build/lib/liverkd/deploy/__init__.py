"""Deployment side (liverkd.deploy): export, calibration, engine bundles, backends, Segmenter,
profile, the device runner. No torch at run time; only liverkd.deploy.export imports it (lazily)."""

__all__ = ["Segmenter"]


def __getattr__(name):
    # Lazy, so that `import liverkd.deploy.bundle` stays light; neither path imports torch.
    if name == "Segmenter":
        from liverkd.deploy.segment import Segmenter

        return Segmenter
    raise AttributeError(f"module 'liverkd.deploy' has no attribute {name!r}")
