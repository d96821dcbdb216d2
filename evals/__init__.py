"""Evaluation: lm-eval harness integration for losslab checkpoints."""
