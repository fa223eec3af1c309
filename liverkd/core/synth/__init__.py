"""Synthetic CT with liver labels: anatomy (procedural or a TotalSegmentator label map) ->
domain-randomised appearance -> scanner model -> MSD-layout data set.

Modules, one idea each: tissues (the label vocabulary), fields (smooth random fields), shapes
(implicit shapes), anatomy (the procedural Patient), labelmaps (reading a TotalSegmentator
subject), placement (affine, elastic, field of view), body (outline, wall, fat, filler, table,
arms), randomize (per-tissue HU and texture draws, lesions), render (all of it on the output
grid, with partial volume), scanner (blur, thick slices, noise, bias, clipping), dataset
(seeds, synth, write_dataset). numpy, scipy and nibabel only.
"""

from liverkd.core.synth.anatomy import Patient
from liverkd.core.synth.dataset import FOV_MM, case_seed, scanner_grid_case, synth, synth_case, write_dataset
from liverkd.core.synth.labelmaps import LabelMap, find_subjects, load_labelmap
from liverkd.core.synth.render import grid_axes

__all__ = [
    "FOV_MM",
    "LabelMap",
    "Patient",
    "case_seed",
    "find_subjects",
    "grid_axes",
    "load_labelmap",
    "scanner_grid_case",
    "synth",
    "synth_case",
    "write_dataset",
]
