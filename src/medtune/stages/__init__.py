"""Training stages. Each stage module is wiring: config -> data -> model -> a transformers/TRL trainer -> outputs.

The shared pieces (resume, TensorBoard, metrics, result files) live in `medtune.stages.common`.
"""
