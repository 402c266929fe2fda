"""Models: the one place that loads tokenizers and models, attaches LoRA, and builds the embedded tiny models."""
