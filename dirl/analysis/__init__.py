"""Analyses of trained backbones (`dirl attention`)."""
