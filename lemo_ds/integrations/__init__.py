"""lemo_ds inside other training frameworks: ``lemo_ds.integrations.transformers`` (Trainer, TRL's SFTTrainer)."""
