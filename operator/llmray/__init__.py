"""llmray operator (control plane)."""
