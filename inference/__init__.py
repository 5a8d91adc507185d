"""Using a trained model: loading, chat and streaming, scoring, the API server, benchmarks."""
