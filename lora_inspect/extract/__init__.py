"""``extract``: a LoRA from a fine-tuned checkpoint — the best rank-k approximation of every changed
weight's difference ΔW = TUNED − BASE (Eckart–Young), streamed one tensor pair at a time."""
