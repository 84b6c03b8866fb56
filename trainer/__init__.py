"""The USER trainer: streaming loader, model, objective, training loop; the package graph is in
docs/architecture.md."""
