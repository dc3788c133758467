"""Training: sharded TrainState, the pure train step, checkpoints, the trainer loop."""
