"""Self-supervised pretraining: paired views (augment), cohort data, model, losses, schedules, settings, the
step (trainer) and `dirl pretrain` (train)."""
