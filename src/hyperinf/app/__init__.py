"""The product layer: what the `hyperinf` commands do for a user (models and data loading, fine-tuning, mislabel, explain, select)."""
