"""Image IO, dataset layouts, k-shot sampling and synthetic anomalies."""
