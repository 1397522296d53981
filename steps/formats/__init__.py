"""Files between stages: base checkpoints and adapters (ours, the original's, PEFT's), the trainer's work dir, encoded data's sidecar."""
