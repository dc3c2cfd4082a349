"""How good is a model, and what does it look at: eval, report, compare, attention pictures."""
