"""Deployment side: export, calibration, engine bundles, backends, Segmenter, profile, runner.

No torch at run time; only deploy.export imports it (lazily).
"""
