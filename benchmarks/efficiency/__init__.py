"""L2T vs GRPO token-efficiency experiment on the synthetic arithmetic task (docs/efficiency.md)."""
