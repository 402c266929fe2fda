"""medtune: turn a general Hugging Face LLM into a Chinese medical-domain model.

Layers, lowest first (each imports only from those below it):
config -> data -> templates -> models -> stages -> eval/serve -> pipeline/cli.
"""

__version__ = "0.1.0"
