"""llmray workloads (data plane): training and serving programs that run inside Ray."""
