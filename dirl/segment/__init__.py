"""Nuclei segmentation, cell classes and per-pixel prior maps.

- `base`: the backend interface and registry (`watershed`, `unet`, `cellpose`, `import`, or "package.module:Class").
- `watershed`: classical CPU segmenter; `cellpose_backend`: Cellpose 4, batched and pipelined on GPU.
- `unet`: learned nucleus centres (a small CPU network) with the watershed's outlines; `unet_train` trains it.
- `features`: stain optical densities and the per-nucleus table.
- `run`: `dirl segment` (tiles store -> cells store).
- `phenotype`: `dirl phenotype` (cells stores -> cohort cell classes, model.json + gallery).
- `priors`: `dirl priors` (tiles + cells + model.json -> priors store + overlay).

Nothing heavy is imported here: `dirl segment --backend watershed` never loads torch.
"""
