"""Entry points, run from the repo root as `python -m scripts.NAME`; nothing in the project imports them."""
