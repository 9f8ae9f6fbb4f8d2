"""DiRL: prior-guided dense self-supervised pretraining for whole-slide pathology (Kapse et al. 2023).

Import cost matters: Snakemake starts one process per slide, so this package imports nothing heavy at
the top level. Submodules import torch/timm lazily where they need them.
"""

__version__ = "0.1.0"
