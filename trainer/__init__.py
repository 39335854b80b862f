"""hpr-train: build HPR checkpoints from contrastive answer pairs (TruthfulQA by default) and evaluate them."""
