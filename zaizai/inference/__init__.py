"""A trained model at work: the decoding engine on the model's own forward pass, sampling, prompt fitting,
streaming text, chat sessions, `load`.
"""
