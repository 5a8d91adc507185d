"""Developer tooling beside the product: offline stand-ins for the hub assets (tests, demo), data shaped like the
published files, and the benchmark harnesses. Run from the repo root as `python -m dev.NAME`; the product packages
(model, dataset, trainer, inference) never import it."""
