"""Data layer: read every supported input format into one internal shape, with file:line provenance.

Nothing here imports torch or transformers at module level, so `medtune data check` starts fast.
"""
