"""Multi-task (MMoE) recommender training on TorchRec."""
