"""Slide-level multiple-instance learning on tile features: models, bags, splits, training, heatmaps.

`dirl mil` (train.py) runs patient-level cross-validation of one MIL model on one feature source;
`dirl summary` (summary.py) puts several runs side by side.
"""
