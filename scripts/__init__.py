"""Entry points, run from the repo root as `python -m scripts.NAME` (started as a file, each says so); nothing in
the project imports them."""
