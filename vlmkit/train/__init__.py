"""Fine-tuning: conversation data, batching and the training loop."""
