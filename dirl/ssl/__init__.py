"""Self-supervised pretraining: paired views (augment), cohort data, model, losses, schedules, `dirl pretrain` (train)."""
