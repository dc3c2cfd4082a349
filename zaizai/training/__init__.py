"""Training: configs and presets, the optimizer, checkpoints, metrics, loss evaluation and the loop (setup ->
train_step -> finish).
"""
