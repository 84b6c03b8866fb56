"""The USER trainer: streaming loader, model, objective, training loop (issues 3-5)."""
