"""Fine-tuning: the crash-safe run folder, the optimiser recipe, Trainer metrics and the paper's ablation variants."""
