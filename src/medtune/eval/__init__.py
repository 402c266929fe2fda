"""Evaluation: CMB-Exam, CMB-Clin, perplexity and the drug-safety probe, against a local model (+ adapter) or
any OpenAI-compatible endpoint. Consumers of models and templates; they never train."""
