"""From text files to training batches: corpus reading, dialogue formats and rendering, tokenizers, `prepare`,
token bins, batches.
"""
