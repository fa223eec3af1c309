"""The tissue vocabulary every anatomy source labels its voxels with (uint8 ids, 0 = nothing).

A source (the procedural Patient, a TotalSegmentator subject) says WHAT is where; the
appearance draw (randomize) says what HU each tissue gets in this case. Tissues are groups
that share an intensity prior, not anatomical structures: all veins are one tissue.
"""

from __future__ import annotations

TISSUES = (
    "liver", "spleen", "kidney", "cyst", "pancreas", "gland", "stomach", "bowel", "gallbladder", "bladder",
    "artery", "vein", "portal", "heart", "lung", "airway", "esophagus", "muscle", "cortical", "cancellous",
    "cartilage", "neural", "fat", "viscera",
)  # fmt: skip
"""`viscera` marks space inside the body that no structure claims: the body model fills it
(fat, mesentery, bowel-like texture), exactly like the unlabelled space of a real label map."""

ID = {name: i + 1 for i, name in enumerate(TISSUES)}
LIVER = ID["liver"]
N_IDS = len(TISSUES) + 1
