"""Token ids with a meaning shared by the data, the models and the training loop."""

IGNORE_INDEX = -1  # a target the loss skips: padding, or a turn whose tokens are not learned (see --loss-on)
